"""The ``longmem`` command line.

Each subcommand lives next to the code it drives and registers itself through an
``add_parser(subparsers)`` function; this module only assembles them and turns every
``LongMemError`` (and the few other foreseeable failures) into one line on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from longmem.errors import LongMemError

# module -> registers one or more subcommands via add_parser(subparsers)
_COMMAND_MODULES = [
    "longmem.cli.data",
    "longmem.cli.pretrain",
    "longmem.cli.train",
    "longmem.cli.demo",
    "longmem.cli.memory",
    "longmem.cli.staleness",
    "longmem.cli.eval",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longmem",
        description="LongMem: a frozen causal LM with a long-term memory read by a trainable SideNet.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:  # a command module not written yet
            if e.name == name:
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except LongMemError as e:
        print(f"longmem {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"longmem {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # disk full, permission denied, missing file not caught earlier
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"longmem {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


def _quiet_libraries() -> None:
    """HF's own progress bars and advice go to stderr and would bury our one-line errors."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass

