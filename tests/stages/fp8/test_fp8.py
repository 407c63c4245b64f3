"""FP8 quantization functions: one definition, every path bit-identical, within the bound."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightpipe.pipeline import WeightpipeError
from weightpipe.stages.fp8 import (
    FP8_ARITHMETICS,
    FP8_DTYPE,
    FP8_EPSILON,
    FP8_METHODS,
    SCALE_FORMATS,
    Fp8Arithmetic,
    Fp8CheckError,
    Fp8Method,
    Fp8Tensor,
    NonFiniteWeightError,
    ScaleFormat,
    _numba,
    check_fp8,
    cpu,
    dequantize_fp8,
    fp8_scale_from_amax,
    quantize_block_fp8,
    quantize_channel_fp8,
    quantize_fp8,
    quantize_fp8_many,
    quantize_fp8_reference,
    quantize_tensor_fp8,
    scale_shape,
    verl_multiplier_from_amax,
    warm_up_cpu_kernel,
)

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
KERNELS = ["torch", "numba"]


@pytest.fixture(params=KERNELS)
def cpu_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once per CPU block kernel (numba skipped where it is not installed)."""
    kernel: str = request.param
    if kernel == "numba":
        pytest.importorskip("numba")
    monkeypatch.setattr(cpu, "_CPU_KERNEL", kernel)
    return kernel


METHODS = FP8_METHODS
FORMATS = SCALE_FORMATS


def _weight(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0, std: float = 0.02
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * std).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def assert_same(a: Fp8Tensor, b: Fp8Tensor) -> None:
    assert a.qweight.dtype == b.qweight.dtype == FP8_DTYPE
    assert a.qweight.shape == b.qweight.shape
    assert torch.equal(_bits(a.qweight), _bits(b.qweight))
    assert a.scale.dtype == b.scale.dtype == torch.float32
    assert a.scale.shape == b.scale.shape
    assert torch.equal(a.scale, b.scale)


@pytest.mark.parametrize("shape", [(1, 1), (127, 129), (128, 128), (3, 130, 257)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale_fmt", FORMATS)
@pytest.mark.parametrize("arithmetic", FP8_ARITHMETICS)
def test_fast_path_equals_definition(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    method: Fp8Method,
    scale_fmt: ScaleFormat,
    arithmetic: Fp8Arithmetic,
    cpu_kernel: str,
) -> None:
    w = _weight(shape, dtype)
    if shape[-1] > 128:
        w[..., :128, :128] = 0.0  # an all-zero block (verl: scale 1)
        w[..., :128, 128:] *= 1e-3  # a block whose amax is below the 1e-4 epsilon
    if arithmetic == "verl" and (method != "block" or scale_fmt != "float32"):
        # verl's quantizer has neither: refused by every entry, naming the tensor.
        with pytest.raises(ValueError, match=r"'w'.*arithmetic='verl'"):
            quantize_fp8(w, method=method, scale_fmt=scale_fmt, arithmetic=arithmetic, name="w")
        with pytest.raises(ValueError, match=r"'w'.*arithmetic='verl'"):
            quantize_fp8_reference(
                w, method=method, scale_fmt=scale_fmt, arithmetic=arithmetic, name="w"
            )
        return
    ref = quantize_fp8_reference(w, method=method, scale_fmt=scale_fmt, arithmetic=arithmetic)
    for threads in (1, 2):
        got = quantize_fp8(
            w, method=method, scale_fmt=scale_fmt, arithmetic=arithmetic, threads=threads
        )
        assert_same(got, ref)
    assert got.scale.shape == scale_shape(shape, method)
    worst = check_fp8(w, got)
    assert 0.0 <= worst <= 1.0


def test_block_scale_shapes_cover_partial_edges(cpu_kernel: str) -> None:
    q, s = quantize_block_fp8(_weight((127, 129), torch.bfloat16))
    assert q.shape == (127, 129)  # no padding in the output
    assert s.shape == (1, 2)
    q, s = quantize_block_fp8(_weight((257, 128), torch.bfloat16))
    assert s.shape == (3, 1)
    q, s = quantize_block_fp8(_weight((300, 200), torch.bfloat16), block=(64, 32))
    assert s.shape == (5, 7)
    assert_same(
        Fp8Tensor(q, s),
        quantize_fp8_reference(_weight((300, 200), torch.bfloat16), block=(64, 32)),
    )


def test_large_llama_mlp_matrix_every_block_within_bound() -> None:
    # 4096 x 11008 (Llama-2-7B's MLP), once: bit-identical to the definition and every
    # element of every block within the FP8 bound.
    w = _weight((4096, 11008), torch.bfloat16, seed=3)
    got = quantize_block_fp8(w, threads=2)
    assert got.scale.shape == (32, 86)
    ref = quantize_fp8_reference(w)
    assert_same(got, ref)
    del ref
    assert check_fp8(w, got) <= 1.0


def test_expert_stack_is_quantized_per_expert_matrix(cpu_kernel: str) -> None:
    w = _weight((4, 256, 384), torch.bfloat16)
    w[2] *= 100.0  # a much larger expert must not change the others' scales
    got = quantize_block_fp8(w, threads=2)
    assert got.scale.shape == (4, 2, 3)
    for e in range(4):
        alone = quantize_block_fp8(w[e].clone())
        assert torch.equal(_bits(got.qweight[e]), _bits(alone.qweight))
        assert torch.equal(got.scale[e], alone.scale)
    per: list[tuple[Callable[[torch.Tensor], Fp8Tensor], tuple[int, ...]]] = [
        (quantize_channel_fp8, (4, 256, 1)),
        (quantize_tensor_fp8, (4,)),
    ]
    for fn, shape in per:
        res = fn(w)
        assert res.scale.shape == shape
        assert check_fp8(w, res) <= 1.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_blocks_give_finite_scales_and_zeros(dtype: torch.dtype) -> None:
    w = torch.zeros(200, 300, dtype=dtype)
    w[150:, 200:] = 0.5  # one non-zero block among zero ones
    for method in METHODS:
        for fmt in FORMATS:
            q, s = quantize_fp8(w, method=method, scale_fmt=fmt)
            assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
            deq = q.float()
            assert bool(torch.isfinite(deq).all())
            assert bool((deq[:128, :128] == 0).all())
    q, s = quantize_block_fp8(w)
    assert s[0, 0] == pytest.approx(FP8_EPSILON / 448.0)
    # verl's arithmetic has no epsilon: an all-zero block gets multiplier and scale 1.
    q, s = quantize_block_fp8(w, arithmetic="verl")
    assert float(s[0, 0]) == 1.0 and bool((q[:128, :128].float() == 0).all())
    assert float(s[1, 1]) == float(torch.tensor(1.0) / (torch.tensor(448.0) / 0.5))


def test_ue8m0_scales_are_powers_of_two_and_never_under_scale() -> None:
    gen = torch.Generator().manual_seed(5)
    # Block magnitudes over many octaves, including exact powers of two times 448.
    w = torch.randn(512, 512, generator=gen) * torch.logspace(-6, 3, 512)[:, None]
    w[0, 0] = 448.0
    w[128, 128] = 448.0 * 2.0**-10
    w = w.to(torch.bfloat16)
    q, s = quantize_block_fp8(w, scale_fmt="ue8m0")
    mantissa, _ = torch.frexp(s)
    assert bool((mantissa == 0.5).all())  # exact powers of two
    amax = w.float().abs().view(4, 128, 4, 128).amax(dim=(1, 3)).clamp(min=FP8_EPSILON)
    assert bool((amax.double() / s.double() <= 448.0).all())  # never under-scaled
    assert bool((s >= fp8_scale_from_amax(amax)).all())
    assert bool((s < 2 * fp8_scale_from_amax(amax)).all())  # the smallest such power
    assert check_fp8(w, Fp8Tensor(q, s)) <= 1.0


def test_ue8m0_rounds_scale_bits_up() -> None:
    amax = torch.tensor([448.0, 449.0, 896.0, 0.0, 1.0, 3e30])
    s = fp8_scale_from_amax(amax, "ue8m0")
    exact = fp8_scale_from_amax(amax)
    assert s.tolist()[:3] == [1.0, 2.0, 2.0]
    assert s[3] == 2.0 ** math.ceil(math.log2(FP8_EPSILON / 448.0))
    assert bool((s >= exact).all())


def _e4m3_values() -> list[float]:
    """Every non-negative finite float8_e4m3fn value, from its bits (independently)."""
    values: list[float] = []
    for code in range(0x7F):
        exponent, mantissa = code >> 3, code & 7
        if exponent == 0:
            values.append(mantissa * 2.0**-9)
        else:
            values.append((1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return values


def test_cast_rounds_to_nearest_even_like_an_independent_model(cpu_kernel: str) -> None:
    """With amax = 448 the scale is exactly 1, so q is the e4m3 rounding of w itself."""
    table = _e4m3_values()
    lo = torch.tensor(table[:-1], dtype=torch.float32)
    hi = torch.tensor(table[1:], dtype=torch.float32)
    mid = (lo + hi) / 2  # exact in float32: the ties
    below = torch.nextafter(mid, torch.zeros_like(mid))
    above = torch.nextafter(mid, torch.full_like(mid, 1e9))
    extra = torch.tensor([448.0, 1e-30, 2.0**-10, 3 * 2.0**-11, 2.0**-6, 0.0])
    pos = torch.cat([extra, lo, mid, below, above])
    w = torch.cat([pos, -pos])
    assert len(set(w.tolist())) > 1000
    expected: list[int] = []
    for v in w.tolist():
        dist = [abs(abs(v) - t) for t in table]
        best = min(dist)
        codes = [c for c, d in enumerate(dist) if d == best]
        code = min(codes, key=lambda c: c & 1)  # a tie goes to the even mantissa
        expected.append(code | (0x80 if math.copysign(1.0, v) < 0 else 0))
    expected_t = torch.tensor(expected, dtype=torch.uint8)
    matrix = w.view(1, -1)
    for result in (
        quantize_tensor_fp8(matrix),
        quantize_block_fp8(matrix, block=(1, matrix.shape[1])),
        quantize_fp8_reference(matrix, method="tensor"),
    ):
        assert float(result.scale.flatten()[0]) == 1.0
        assert torch.equal(_bits(result.qweight).flatten(), expected_t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_raises_naming_the_tensor(
    dtype: torch.dtype, bad: float, method: Fp8Method, cpu_kernel: str
) -> None:
    w = _weight((200, 300), dtype)
    w[199, 299] = bad  # in the partial edge block
    with pytest.raises(NonFiniteWeightError, match=r"layers\.7\.mlp\.down_proj") as info:
        quantize_fp8(w, method=method, name="model.layers.7.mlp.down_proj.weight")
    assert info.value.tensor == "model.layers.7.mlp.down_proj.weight"
    with pytest.raises(NonFiniteWeightError):
        quantize_fp8_reference(w, method=method)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_verl_block_too_small_to_scale_is_reported_as_nonfinite(
    dtype: torch.dtype, cpu_kernel: str
) -> None:
    # 448 / amax overflows float32 below 448 / FLT_MAX (~1.3e-36): verl would send an
    # infinite multiplier (scale 0, NaN codes for zeros); weightpipe flags the tensor.
    m, scale = verl_multiplier_from_amax(torch.tensor([0.0, math.inf, 448.0, 1e-37, 2e-36]))
    assert m.tolist()[:3] == [1.0, 1.0, 1.0] and math.isinf(m[3]) and math.isfinite(m[4])
    assert scale.tolist()[:4] == [1.0, 1.0, 1.0, 0.0]
    w = _weight((200, 300), torch.float32)
    w[128:, 256:] = torch.tensor(1e-37).to(dtype).float()  # the partial edge block
    w = w.to(dtype)
    with pytest.raises(NonFiniteWeightError, match=r"'x\.weight'"):
        quantize_fp8(w, arithmetic="verl", name="x.weight", threads=2)
    with pytest.raises(NonFiniteWeightError):
        quantize_fp8_reference(w, arithmetic="verl")
    assert quantize_fp8_many([("x.weight", w)], arithmetic="verl")[0] is None
    # The same weight is fine in SGLang's arithmetic (its epsilon), and one just above the
    # bound is fine in verl's, equal to the definition.
    assert_same(quantize_fp8(w), quantize_fp8_reference(w))
    w[128:, 256:] = torch.tensor(2e-36).to(dtype)
    assert_same(quantize_fp8(w, arithmetic="verl"), quantize_fp8_reference(w, arithmetic="verl"))


def test_many_reports_nonfinite_as_none_and_quantizes_the_rest() -> None:
    good = _weight((130, 140), torch.bfloat16)
    bad = good.clone()
    bad[5, 5] = math.nan
    out = quantize_fp8_many([("a", good), ("b", bad), ("c", good)], threads=2)
    assert out[1] is None
    assert out[0] is not None and out[2] is not None
    assert_same(out[0], quantize_fp8_reference(good))


@pytest.mark.parametrize("dtype", DTYPES)
def test_input_is_never_mutated(dtype: torch.dtype, cpu_kernel: str) -> None:
    # verl's bug: a single block column, no padding, float32 -> scaled in place.
    for shape in ((128, 128), (256, 128), (64, 100), (2, 128, 128)):
        w = _weight(shape, dtype) * 1000
        before = w.clone()
        for method in METHODS:
            quantize_fp8(w, method=method, threads=2)
            quantize_fp8_reference(w, method=method)
        assert torch.equal(w, before)
    # A non-contiguous view of a larger tensor is read, not written.
    base = _weight((256, 256), dtype)
    snapshot = base.clone()
    quantize_block_fp8(base.t())
    assert torch.equal(base, snapshot)


def test_non_contiguous_input_equals_contiguous() -> None:
    base = _weight((300, 260), torch.bfloat16)
    assert_same(quantize_block_fp8(base.t()), quantize_block_fp8(base.t().contiguous()))


def test_parameter_that_requires_grad_is_read_as_data(cpu_kernel: str) -> None:
    param = torch.nn.Parameter(_weight((200, 130), torch.float32))
    for method in METHODS:
        got = quantize_fp8(param, method=method, threads=2)
        assert not got.qweight.requires_grad
        assert_same(got, quantize_fp8_reference(param.detach(), method=method))


def test_dequantize_round_trips_and_infers_the_method() -> None:
    w = _weight((300, 260), torch.bfloat16)
    for method in METHODS:
        q, s = quantize_fp8(w, method=method)
        deq = dequantize_fp8(q, s, dtype=torch.float32)
        assert deq.shape == w.shape
        err = (deq - w.float()).abs()
        assert float(err.max()) <= float(w.float().abs().max()) * 2.0**-4 + 1e-6
    with pytest.raises(ValueError, match="fits no FP8 method"):
        dequantize_fp8(q, torch.ones(7, 7))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        dequantize_fp8(w, s)


def test_check_detects_a_wrong_element_and_names_it() -> None:
    w = _weight((200, 300), torch.bfloat16)
    q, s = quantize_block_fp8(w)
    bad = q.clone()
    bad.view(torch.uint8)[150, 10] ^= 0x10  # flip an exponent bit
    with pytest.raises(Fp8CheckError, match=r"'w'.*\[0, 150, 10\]"):
        check_fp8(w, Fp8Tensor(bad, s), name="w")
    with pytest.raises(Fp8CheckError, match="scale"):
        check_fp8(w, Fp8Tensor(q, s * 0), name="w")
    with pytest.raises(Fp8CheckError, match="shape"):
        check_fp8(w[:10], Fp8Tensor(q, s), name="w")


def test_bad_arguments_raise_with_the_name() -> None:
    w = _weight((4, 4), torch.bfloat16)
    with pytest.raises(ValueError, match=r"'x'.*method"):
        quantize_fp8(w, method="row", name="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scale_fmt"):
        quantize_fp8(w, scale_fmt="e8m0", name="x")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"'x'.*int64"):
        quantize_fp8(torch.ones(4, 4, dtype=torch.int64), name="x")
    with pytest.raises(ValueError, match=r"'x'.*shape"):
        quantize_fp8(torch.ones(4), name="x")
    with pytest.raises(ValueError, match="block"):
        quantize_block_fp8(w, block=(0, 128))


@pytest.mark.parametrize("block", [(128.9, 128), (128,), (128, 128, 1), (True, 128), "128"])
def test_a_block_that_is_not_two_ints_is_refused_naming_it(block: object) -> None:
    # Before one coercion owned this, (128.9, 128) was truncated to (128, 128) and (128,)
    # raised an IndexError.
    w = _weight((256, 256), torch.bfloat16)
    calls: list[Callable[[], object]] = [
        lambda: quantize_fp8(w, block=block, name="x"),  # type: ignore[arg-type]
        lambda: quantize_fp8_reference(w, block=block, name="x"),  # type: ignore[arg-type]
        lambda: quantize_fp8_many([("x", w)], block=block),  # type: ignore[arg-type]
    ]
    q, s = quantize_block_fp8(w)
    calls.append(lambda: dequantize_fp8(q, s, block=block, name="x"))  # type: ignore[arg-type]
    calls.append(lambda: check_fp8(w, Fp8Tensor(q, s), block=block, name="x"))  # type: ignore[arg-type]
    for call in calls:
        with pytest.raises(ValueError, match=r"'x'.*block.*" + re.escape(repr(block))):
            call()


def test_errors_share_weightpipe_error_as_their_base() -> None:
    w = _weight((200, 300), torch.bfloat16)
    q, s = quantize_block_fp8(w)
    with pytest.raises(WeightpipeError) as check:
        check_fp8(w, Fp8Tensor(q, s * 0), name="w")
    assert isinstance(check.value, Fp8CheckError)
    assert not isinstance(check.value, AssertionError)  # `python -O` cannot strip it
    bad = w.clone()
    bad[0, 0] = math.nan
    with pytest.raises(WeightpipeError) as nonfinite:
        quantize_fp8(bad, name="w")
    assert isinstance(nonfinite.value, NonFiniteWeightError)
    assert isinstance(nonfinite.value, ValueError)  # still, for callers that caught that


def test_agrees_with_sglang_per_block_cast_to_fp8(cpu_kernel: str) -> None:
    """SGLang's own quantizer (DeepGEMM's): ue8m0 scales, amax guarded by 1e-4.

    Where the definitions coincide (ue8m0, [128, 128]) the bits must be equal: its
    ``x * (1 / sf)`` equals our ``x / sf`` exactly because sf is a power of two. Our
    float32 scale mode has no SGLang torch counterpart (it is the checkpoint format).
    """
    from weightpipe.benchmarks.quantize import load_sglang_block_quantizer

    sglang = load_sglang_block_quantizer()
    if sglang is None:
        pytest.skip("sglang is not installed")
    for shape in ((127, 129), (256, 384), (300, 200), (1, 1)):
        for dtype in DTYPES:
            w = _weight(shape, dtype, seed=sum(shape)) * 3
            q_ref, s_ref = sglang(w)
            ours = quantize_block_fp8(w, scale_fmt="ue8m0")
            assert torch.equal(_bits(ours.qweight), _bits(q_ref))
            assert torch.equal(ours.scale, s_ref.to(torch.float32))


# ------------------------------------------------------------------ property tests


@st.composite
def weights(draw: st.DrawFn) -> torch.Tensor:
    rows = draw(st.integers(1, 260))
    cols = draw(st.integers(1, 260))
    dtype = draw(st.sampled_from(DTYPES))
    log_std = draw(st.floats(-12, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * math.pow(10.0, log_std)
    zero_rows = draw(st.integers(0, rows))
    w[:zero_rows] = 0.0
    if dtype == torch.float16:
        w = w.clamp(-60000, 60000)
    return w.to(dtype)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    w=weights(),
    method=st.sampled_from(METHODS),
    scale_fmt=st.sampled_from(FORMATS),
    kernel=st.sampled_from(KERNELS),
    arithmetic=st.sampled_from(FP8_ARITHMETICS),
)
def test_property_error_bound_and_definition(
    w: torch.Tensor,
    method: Fp8Method,
    scale_fmt: ScaleFormat,
    kernel: str,
    arithmetic: Fp8Arithmetic,
) -> None:
    if kernel == "numba" and _numba.kernel() is None:
        kernel = "torch"
    if arithmetic == "verl":  # verl's quantizer: float32 block scales only
        method, scale_fmt = "block", "float32"
    saved = cpu._CPU_KERNEL
    cpu._CPU_KERNEL = kernel
    try:
        got = quantize_fp8(w, method=method, scale_fmt=scale_fmt, arithmetic=arithmetic, threads=2)
    finally:
        cpu._CPU_KERNEL = saved
    assert_same(
        got,
        quantize_fp8_reference(w, method=method, scale_fmt=scale_fmt, arithmetic=arithmetic),
    )
    assert check_fp8(w, got) <= 1.0
    if scale_fmt == "ue8m0":
        assert bool((torch.frexp(got.scale)[0] == 0.5).all())


@settings(max_examples=40, deadline=None)
@given(
    amax=st.floats(0.0, 3.0000000054977558e38, allow_nan=False, allow_infinity=False, width=32),
)
def test_property_ue8m0_never_under_scales(amax: float) -> None:
    a = torch.tensor([amax], dtype=torch.float32)
    s = fp8_scale_from_amax(a, "ue8m0")
    assert float(torch.frexp(s)[0]) == 0.5
    assert max(amax, FP8_EPSILON) / float(s) <= 448.0


def test_quotient_one_ulp_above_448_still_maps_to_448(cpu_kernel: str) -> None:
    """amax / RN(amax / 448) can round to 448.00003: the clamp (or the rounding) gives 448."""
    gen = torch.Generator().manual_seed(11)
    amax = torch.rand(4096, generator=gen) * 10 + 0.01
    over = amax / (amax / torch.tensor(448.0)) > 448.0
    assert bool(over.any())
    w = torch.zeros(64, 128)
    picked = amax[over][:64]
    w[: picked.numel(), 0] = picked  # each row block's amax is its own row's value
    for method in METHODS:
        got = quantize_fp8(w, method=method, block=(1, 128))
        assert_same(got, quantize_fp8_reference(w, method=method, block=(1, 128)))
    q = quantize_block_fp8(w, block=(1, 128)).qweight
    assert bool((q[: picked.numel(), 0].float() == 448.0).all())


def test_product_one_ulp_above_448_still_maps_to_448(cpu_kernel: str) -> None:
    """verl's amax * RN(448 / amax) can round above 448: the clamp (or rounding) gives 448."""
    gen = torch.Generator().manual_seed(12)
    amax = torch.rand(4096, generator=gen) * 10 + 0.01
    over = amax * (torch.tensor(448.0) / amax) > 448.0
    assert bool(over.any())
    w = torch.zeros(128, 128)
    picked = amax[over][:128]
    w[: picked.numel(), 0] = picked
    for block in ((1, 1), (128, 128)):
        got = quantize_block_fp8(w, block=block, arithmetic="verl")
        assert_same(got, quantize_fp8_reference(w, block=block, arithmetic="verl"))
    q = quantize_block_fp8(w, block=(1, 1), arithmetic="verl").qweight
    assert bool((q[: picked.numel(), 0].float() == 448.0).all())


def test_warm_up_compiles_every_signature_real_inputs_use() -> None:
    # The first sync must not pay for numba's lazy compilation: after the warm-up, no
    # input dtype or shape adds a signature to the kernel.
    if not warm_up_cpu_kernel():
        pytest.skip("the numba CPU kernel is not in use")
    kernel = _numba.kernel()
    compiled = len(kernel.signatures)
    assert compiled >= 1
    for dtype in DTYPES:
        quantize_fp8(torch.randn(300, 260).to(dtype), name="w")
    assert len(kernel.signatures) == compiled


@pytest.mark.parametrize("method", FP8_METHODS)
def test_a_bf16_default_dtype_changes_nothing(method: Fp8Method, cpu_kernel: str) -> None:
    # Trainers call torch.set_default_dtype(torch.bfloat16); a scratch tensor made with
    # the default dtype then became bf16 (the numba kernel refused it, amax lost bits).
    w = _weight((300, 260), torch.bfloat16, seed=3)
    expected = quantize_fp8_reference(w, method=method)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        got = quantize_fp8(w, method=method)
    finally:
        torch.set_default_dtype(previous)
    assert_same(got, expected)
