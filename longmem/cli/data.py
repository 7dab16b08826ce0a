"""``longmem data`` and ``longmem tokenizer``: prepare the corpora and train a tokenizer."""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
from pathlib import Path

from longmem.data.corpora import (
    AUSTEN_PACKAGE,
    AUSTEN_SPLIT_RULE,
    CODE_MIN_BYTES,
    CODE_SPLIT_RULE,
    austen_splits,
    code_splits,
    fetch_austen,
    read_austen_rdata,
    train_tokenizer,
    write_corpus,
)

# --------------------------------------------------------------------------- CLI


def _run_data(args: argparse.Namespace) -> int:
    corpora = ["books", "code"] if args.corpus == "all" else [args.corpus]
    for corpus in corpora:
        if corpus == "books":
            with tempfile.TemporaryDirectory(prefix="longmem-austen-") as work:
                data_dir = Path(args.austen_dir) if args.austen_dir else fetch_austen(work)
                splits = austen_splits(read_austen_rdata(data_dir))
                folder = write_corpus(args.out, "books", splits,
                                      f"Debian package {AUSTEN_PACKAGE}", AUSTEN_SPLIT_RULE)
        else:
            splits = code_splits(args.stdlib, args.min_bytes)
            root = args.stdlib or sysconfig.get_paths()["stdlib"]
            folder = write_corpus(args.out, "code", splits,
                                  f"Python {sys.version.split()[0]} stdlib at {root}",
                                  CODE_SPLIT_RULE)
        summary = ", ".join(
            f"{s} {len(d)} docs / {sum(len(x.text) for x in d):,} chars" for s, d in splits.items()
        )
        print(f"{corpus}: {summary} -> {folder}")
    return 0


def _run_tokenizer(args: argparse.Namespace) -> int:
    tok = train_tokenizer(args.data, args.vocab_size, args.out, show_progress=True)
    print(f"tokenizer: {len(tok)} tokens -> {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "data", help="prepare the long-document corpora (Austen novels, Python stdlib)",
        description="Write OUT/<corpus>/{train,validation,test}.jsonl and manifest.json. "
        "books: Jane Austen's six novels from Debian r-cran-janeaustenr (split by novel: "
        "validation Persuasion, test Emma, the other four train). code: the Python standard "
        "library's .py files >= 20 KB (split by sha1 of the path: 90/5/5).",
    )
    p.add_argument("corpus", choices=["books", "code", "all"], help="which corpus to prepare")
    p.add_argument("--out", default="data", help="output folder (default: data)")
    p.add_argument("--austen-dir", default=None,
                   help="an unpacked janeaustenr data/ folder (Rdata.rdb/.rdx) instead of "
                   "apt-get download")
    p.add_argument("--stdlib", default=None,
                   help="standard library folder (default: the running interpreter's)")
    p.add_argument("--min-bytes", type=int, default=CODE_MIN_BYTES,
                   help=f"smallest .py file kept for code (default: {CODE_MIN_BYTES})")
    p.set_defaults(func=_run_data)

    t = sub.add_parser(
        "tokenizer", help="train a byte-level BPE tokenizer (HF format)",
        description="Train a byte-level BPE with <|endoftext|> as bos/eos/pad on the given "
        "training documents (use training splits only) and save it with save_pretrained.",
    )
    t.add_argument("--data", nargs="+", required=True,
                   help="text files, folders, .jsonl files or hf:NAME[:SPLIT]")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size (default: 8192)")
    t.add_argument("--out", required=True, help="output folder for the tokenizer")
    t.set_defaults(func=_run_tokenizer)
