"""The `fedtreelora` command: one subcommand per module of this package (`aggregate`, `simulate`)."""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

# subcommand -> module in fedtreelora.cli exposing `add_arguments(parser)` and `run(args) -> int`
SUBCOMMANDS = {
    "aggregate": "Aggregate PEFT adapter folders of clients into personalised cluster/external experts.",
    "simulate": "Run the federated experiment (all methods) in-process and write a run folder.",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtreelora", description="FedTreeLoRA: personalised federated LoRA with a layer-wise client tree.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in SUBCOMMANDS.items():
        module = import_module(f"fedtreelora.cli.{name}")
        p = sub.add_parser(name, help=help_text, description=(module.__doc__ or help_text),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
