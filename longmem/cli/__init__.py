"""The ``longmem`` command line.

Each command group is one module of this package (``longmem.cli.data``, ``.train``, ``.eval``, ...) with an
``add_parser(subparsers)`` function; this module only assembles them and turns every
``LongMemError`` (and the few other foreseeable failures) into one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from longmem.cli import adapt, data, demo
from longmem.cli import eval as evaluate
from longmem.cli import memory, pretrain, serve, staleness, train
from longmem.errors import LongMemError
from longmem.malloc import reuse_freed_memory

# each registers one or more subcommands via add_parser(subparsers), in this order in --help
COMMANDS = (data, pretrain, train, adapt, demo, memory, staleness, evaluate, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="longmem",
        description="LongMem: a frozen causal LM with a long-term memory read by a trainable SideNet.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    reuse_freed_memory()  # every command allocates the same large blocks over and over
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

