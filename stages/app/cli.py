"""The ``weightpipe`` command: ``demo``, ``bench`` and ``config show``.

Every setting comes from the OmegaConf configuration (``--config FILE`` plus
``key=value`` overrides, see ``weightpipe config show``); the few flags here are
shortcuts for the common ones. Heavy imports happen inside the sub-command that needs
them, so ``weightpipe config show`` answers instantly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from weightpipe.pipeline.config import ConfigError, to_yaml
from weightpipe.stages.app.config import WeightpipeConfig, load_weightpipe_config
from weightpipe.stages.app.timeline import DEFAULT_TIMELINE

__all__ = ["main"]


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="a YAML file merged over the defaults")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="dotlist overrides, e.g. depth=4 quantize.block=[128,128]",
    )


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightpipe",
        description="Pipelined, backpressured weight sync from RL trainers into SGLang.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a small model and sync it into a generating engine",
        description="A trainer runs real optimizer steps; every demo.sync_every steps the "
        "new weights go Fetch -> Fp8Quantize -> Load into an engine that keeps generating.",
    )
    demo.add_argument(
        "--engine",
        choices=["local", "sglang"],
        help="local: the embedded engine (default); sglang: a running SGLang server at --url",
    )
    demo.add_argument("--url", help="SGLang server URL (engine.url)")
    demo.add_argument("--api-key", help="SGLang server API key (engine.api_key)")
    demo.add_argument("--mode", choices=["pause", "prefetch", "in_flight"], help="engine.mode")
    demo.add_argument("--no-progress", action="store_true", help="no live display")
    demo.add_argument(
        "--trace",
        metavar="PATH",
        help="keep each sync's Chrome/Perfetto trace, one file per sync: PATH with "
        "-v<version> before its suffix (trace.json -> trace-v1.json, ...)",
    )
    demo.add_argument(
        "--timeline",
        metavar="PATH",
        default=DEFAULT_TIMELINE,
        help="where to draw the last sync's timeline (PNG; default: %(default)s)",
    )
    _add_config_args(demo)

    bench = commands.add_parser(
        "bench",
        help="sweep depth x bucket size and recommend a setting",
        description="Runs the sweep of weightpipe.stages.app.bench (benchmarks/sweep.py is "
        "its script) with settings from the sweep section.",
    )
    bench.add_argument("--json", metavar="PATH", default="weightpipe-sweep.json")
    bench.add_argument("--plot", metavar="PATH", default="weightpipe-sweep.png")
    _add_config_args(bench)

    config = commands.add_parser("config", help="inspect the configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser("show", help="print the merged configuration as YAML")
    _add_config_args(show)
    return parser


def _demo_overrides(args: argparse.Namespace) -> list[str]:
    extra: list[str] = []
    if args.engine == "sglang":
        extra.append("engine.kind=sglang_http")
    elif args.engine == "local":
        extra.append("engine.kind=local")
    if args.mode:
        extra.append(f"engine.mode={args.mode}")
    if args.no_progress:
        extra.append("demo.progress=false")
    return extra


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``weightpipe`` console script; returns the exit status."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.command == "demo":
        overrides += _demo_overrides(args)
    try:
        config: WeightpipeConfig = load_weightpipe_config(args.config, overrides)
    except ConfigError as exc:
        print(f"weightpipe: {exc}", file=sys.stderr)
        return 2
    if args.command == "demo":
        # Free-form strings are set on the typed config, not parsed as override grammar
        # (an API key may hold characters the dotlist parser would interpret).
        if args.url:
            config.engine.url = args.url
        if args.api_key:
            config.engine.api_key = args.api_key
    if args.command == "config":
        print(to_yaml(config), end="")
        return 0
    if args.command == "demo":
        from weightpipe.stages.app.demo import run_demo

        return run_demo(config, trace=args.trace, timeline=args.timeline)
    from weightpipe.stages.app.bench import run_sweep

    return run_sweep(config, json_path=args.json, plot_path=args.plot)


if __name__ == "__main__":
    sys.exit(main())
