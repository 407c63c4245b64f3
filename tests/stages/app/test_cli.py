"""The weightpipe command: config show, bad keys and exit statuses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from weightpipe.stages.app.cli import main


def test_config_show_prints_merged_yaml(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "depth=5", "quantize.block=[64,64]"]) == 0
    out = capsys.readouterr().out
    assert "depth: 5" in out
    assert "- 64" in out


def test_unknown_key_exits_2_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "show", "quantize.blok=1"]) == 2
    err = capsys.readouterr().err
    assert "quantize.blok" in err and "quantize.block" in err


def test_console_script_is_installed() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "weightpipe.stages.app.cli", "config", "show", "engine.mode=pause"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "mode: pause" in done.stdout


@pytest.mark.parametrize("what", ["directory", "missing", "bad yaml"])
def test_a_bad_config_file_is_one_line_and_exit_2(
    what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = {"directory": tmp_path, "missing": tmp_path / "none.yaml"}.get(what)
    if path is None:
        path = tmp_path / "bad.yaml"
        path.write_text("depth: 3\nfetch: [1\n")
    assert main(["config", "show", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"weightpipe: config file {str(path)!r}")
    assert "Traceback" not in err


def test_config_show_of_a_directory_from_the_shell() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "weightpipe.stages.app.cli", "config", "show", "--config", "/tmp"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr == "weightpipe: config file '/tmp': is a directory, not a YAML file\n"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], (None, "weightpipe-demo-timeline.png")),
        (["--trace", "t.json", "--timeline", "out/t.png"], ("t.json", "out/t.png")),
    ],
)
def test_demo_passes_trace_and_timeline_to_run_demo(
    flags: list[str], expected: tuple[str | None, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from weightpipe.stages.app import demo

    seen: list[tuple[object, object]] = []

    def fake_run_demo(config: object, *, trace: object = None, timeline: object = None) -> int:
        seen.append((trace, timeline))
        return 0

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert main(["demo", *flags]) == 0
    assert seen == [expected]
