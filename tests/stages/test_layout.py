"""Invariants of the pure bucketing helpers, as hypothesis properties plus edge cases."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import DTYPES, as_bytes, random_tensor
from weightpipe.stages._layout import (
    BucketPlanner,
    TensorLayout,
    align_up,
    flatten,
    layout_of,
    plan_buckets,
    tensor_alignment,
    unflatten,
)

sizes_and_aligns = st.lists(
    st.tuples(st.integers(0, 5000), st.sampled_from([1, 2, 4, 8, 256])), max_size=60
)


@settings(max_examples=300, deadline=None)
@given(items=sizes_and_aligns, bucket_bytes=st.integers(1, 6000))
def test_plan_invariants(items: list[tuple[int, int]], bucket_bytes: int) -> None:
    sizes = [size for size, _ in items]
    aligns = [align for _, align in items]
    plan = plan_buckets(sizes, bucket_bytes, align=aligns)
    # Every tensor exactly once, in order, in consecutive non-empty buckets.
    assert [i for bucket in plan for i in bucket] == list(range(len(sizes)))
    assert all(len(bucket) > 0 for bucket in plan)
    for bucket in plan:
        end = 0
        for i in bucket:
            offset = align_up(end, aligns[i]) if i != bucket.start else 0
            assert offset % aligns[i] == 0
            end = offset + sizes[i]
        # Within the bound, unless one lone tensor larger than it.
        assert end <= bucket_bytes or (len(bucket) == 1 and sizes[bucket.start] > bucket_bytes)
    # Greedy: the first tensor of each next bucket did not fit in the previous one.
    for previous, following in itertools.pairwise(plan):
        end = 0
        for i in previous:
            end = (align_up(end, aligns[i]) if i != previous.start else 0) + sizes[i]
        first = following.start
        assert align_up(end, aligns[first]) + sizes[first] > bucket_bytes


def test_plan_edges() -> None:
    assert plan_buckets([], 10) == []
    assert plan_buckets([0, 0, 0], 1) == [range(0, 3)]
    assert plan_buckets([20, 1, 1], 10) == [range(0, 1), range(1, 3)]  # oversize alone
    assert plan_buckets([5, 5, 5], 10) == [range(0, 2), range(2, 3)]
    assert plan_buckets([5, 5], 10, align=8) == [range(0, 1), range(1, 2)]  # padding counts
    with pytest.raises(ValueError, match="bucket_bytes"):
        plan_buckets([1], 0)
    with pytest.raises(ValueError, match="negative"):
        plan_buckets([-1], 10)
    with pytest.raises(ValueError, match="alignments"):
        plan_buckets([1, 2], 10, align=[1])


def test_planner_after_oversize_opens_new_bucket_even_for_empty_tensor() -> None:
    planner = BucketPlanner(10)
    assert planner.place(50, 1) == (True, 0)
    assert planner.place(0, 1) == (True, 0)


tensor_specs = st.lists(
    st.tuples(
        st.sampled_from(DTYPES),
        st.lists(st.integers(0, 7), max_size=3).map(tuple),
        st.integers(0, 2**31),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None)
@given(specs=tensor_specs, align=st.sampled_from([1, 2, 16, 256]))
def test_flatten_round_trip_is_bit_exact_and_aligned(
    specs: list[tuple[torch.dtype, tuple[int, ...], int]], align: int
) -> None:
    pairs = [(f"t{i}", random_tensor(d, shape, seed)) for i, (d, shape, seed) in enumerate(specs)]
    buffer, layout = flatten(pairs, align)
    assert buffer.dtype == torch.uint8
    assert buffer.dim() == 1
    covered = torch.zeros(buffer.numel(), dtype=torch.int32)
    for entry, (name, tensor) in zip(layout, pairs, strict=True):
        assert entry.name == name
        assert entry.offset % tensor_alignment(tensor.dtype, align) == 0
        covered[entry.offset : entry.end] += 1
    assert not bool((covered > 1).any())  # no byte belongs to two tensors
    rebuilt = unflatten(buffer, layout)
    for (name, got), (_, want) in zip(rebuilt, pairs, strict=True):
        assert got.dtype == want.dtype
        assert got.shape == want.shape
        assert torch.equal(as_bytes(got), as_bytes(want)), name
        if got.numel():
            assert got.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_flatten_copies_non_contiguous_tensors() -> None:
    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    pairs = [("a", torch.ones(3, dtype=torch.bfloat16)), ("t", base.t()), ("s", base[:, ::2])]
    buffer, layout = flatten(pairs, 256)
    for (_, got), (_, want) in zip(unflatten(buffer, layout), pairs, strict=True):
        assert torch.equal(got, want)
        assert got.is_contiguous()


def test_layout_of_and_alignment() -> None:
    layout, total = layout_of([("a", torch.zeros(3, dtype=torch.int8)), ("b", torch.zeros(1))], 1)
    assert [e.offset for e in layout] == [0, 4]  # float32 needs 4-byte alignment
    assert total == 8
    assert tensor_alignment(torch.float64, 1) == 8
    assert tensor_alignment(torch.float64, 256) == 256
    with pytest.raises(ValueError, match="alignment"):
        align_up(3, 0)


def test_unflatten_rejects_bad_layouts_naming_the_tensor() -> None:
    buffer = torch.zeros(16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"'w'.*reach past"):
        unflatten(buffer, [TensorLayout("w", torch.float32, (8,), 0, 32)])
    with pytest.raises(ValueError, match=r"'w'.*not a multiple"):
        unflatten(buffer, [TensorLayout("w", torch.float32, (2,), 2, 8)])
