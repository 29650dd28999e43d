"""The ``compt`` command line: tools around chain runs (training itself is launch/chain.py).

Every module in ``compt.commands`` is a subcommand (``compt eval``, ...).
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import compt.commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="compt",
        description="Chain-of-Models Pre-Training tools. Train a chain with: "
                    "deepspeed launch/chain.py --ds_config ds_configs/zero3.json",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(compt.commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"compt.commands.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
