"""`shadow` command line: one module per subcommand, each with `register(subparsers)`.

The entry point only parses and dispatches; every command builds, runs and closes through the
package's modules. Exit codes: 0 success, 1 the run failed, 2 bad input (config, arguments).
"""

from __future__ import annotations

import argparse
import sys

from shadow.config import ConfigError
from shadow.model_errors import ModelError


def _commands():
    # Command modules import torch/ray inside `run`, so `shadow policy check` starts fast.
    from shadow.cli import (calibrate_cmd, compare_cmd, policy_cmd, replay_cmd, report_cmd, run_cmd, sweep_cmd,
                            train_cmd)

    return [run_cmd, train_cmd, replay_cmd, compare_cmd, policy_cmd, report_cmd, calibrate_cmd, sweep_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shadow", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _commands():
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ModelError) as exc:
        print(str(exc), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
