"""`shadow policy check FILE...`: validate policy files and print the effective policy of each."""

from __future__ import annotations

import argparse
import sys

from shadow.config.loader import ConfigError, to_yaml
from shadow.config.policy import load_policy


def register(subparsers) -> None:
    parser = subparsers.add_parser("policy", help="work with policy files")
    actions = parser.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = actions.add_parser(
        "check", help="validate policy files",
        description="Exit 0 and print each file's effective policy, or exit 2 with one line per problem.")
    check.add_argument("files", nargs="+", metavar="FILE", help="policy YAML files")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field, e.g. thresholds.switch=0.05 (repeatable)")
    check.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    failed = False
    for path in args.files:
        try:
            policy = load_policy(path, args.overrides)
        except ConfigError as exc:
            print(str(exc), file=sys.stderr)
            failed = True
            continue
        print(f"# {path}: ok, effective policy")
        print(to_yaml(policy))
    return 2 if failed else 0
