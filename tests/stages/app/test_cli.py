"""The weightpipe command: config show, bad keys and exit statuses."""

from __future__ import annotations

import subprocess
import sys

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
