"""The ``qscope`` command line."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> None:
    from .demo import tiny_demo

    tiny_demo(args.prompt, layer=args.layer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qscope", description="Qwen-Scope sparse autoencoders for HF and TRL")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="encode a prompt with an SAE, offline")
    demo.add_argument("--prompt", default="Sparse autoencoders find features.")
    demo.add_argument("--layer", type=int, default=1)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)
