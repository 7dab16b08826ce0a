"""``longmem data`` and ``longmem tokenizer``: prepare the corpora (``data books|code|all``), build copy-rich
corpora from them (``data recall``) and train a tokenizer."""

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
from longmem.data.pycode import PACKAGES, write_package_code
from longmem.data.recall import write_dense_corpus, write_recall_corpus

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


def _run_recall(args: argparse.Namespace) -> int:
    if args.dense:
        n, chars = write_dense_corpus(args.inputs, Path(args.out), args.dense, args.dense_lines, args.seed)
    else:
        n, chars = write_recall_corpus(args.inputs, Path(args.out), args.piece_chars, args.passages,
                                       args.passage_chars, args.min_back, args.seed, args.every, args.random_lines)
    print(f"{n} documents, {chars:,} characters -> {args.out}")
    return 0


def _run_pycode(args: argparse.Namespace) -> int:
    m = write_package_code(Path(args.out), args.packages, args.min_bytes)
    print(f"{m['documents']} files, {m['characters']:,} characters ({m['duplicates_dropped']} duplicates dropped) "
          f"-> {args.out}")
    return 0


def _run_tokenizer(args: argparse.Namespace) -> int:
    tok = train_tokenizer(args.data, args.vocab_size, args.out, show_progress=True)
    print(f"tokenizer: {len(tok)} tokens -> {args.out}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "data", help="prepare the long-document corpora (Austen novels, Python stdlib) or copy-rich ones",
        description="books / code / all: write OUT/<corpus>/{train,validation,test}.jsonl and manifest.json. "
        "books: Jane Austen's six novels from Debian r-cran-janeaustenr (split by novel: "
        "validation Persuasion, test Emma, the other four train). code: the Python standard "
        "library's .py files >= 20 KB (split by sha1 of the path: 90/5/5). "
        "recall: a copy-rich corpus built from JSONL documents (see `longmem data recall --help`).",
    )
    corpora = p.add_subparsers(dest="corpus", metavar="CORPUS")
    corpora.required = True
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="data", help="output folder (default: data)")
    common.add_argument("--austen-dir", default=None,
                        help="an unpacked janeaustenr data/ folder (Rdata.rdb/.rdx) instead of "
                        "apt-get download")
    common.add_argument("--stdlib", default=None,
                        help="standard library folder (default: the running interpreter's)")
    common.add_argument("--min-bytes", type=int, default=CODE_MIN_BYTES,
                        help=f"smallest .py file kept for code (default: {CODE_MIN_BYTES})")
    for corpus, what in (("books", "Jane Austen's novels"), ("code", "the Python standard library"),
                         ("all", "books and code")):
        c = corpora.add_parser(corpus, parents=[common], help=f"prepare {what}")
        c.set_defaults(func=_run_data)

    r = corpora.add_parser(
        "recall", help="a copy-rich corpus: passages and made-up lines repeated beyond the window",
        description="Cut every document of INPUTS into pieces of --piece-chars characters and append to each "
        "--passages passages copied from at least --min-back characters before the piece's end, so that only a "
        "memory holds them; --random-lines K also inserts K made-up lines (vokaru_ti = pelzo(nimaxe, 4172)) early "
        "in each piece and copies them at its end. With --dense N, write N copy-dense documents instead: 1,500 "
        "characters of a random document, --dense-lines made-up lines, 1,500 more characters, the same lines "
        "shuffled.",
    )
    r.add_argument("inputs", nargs="+", help="JSONL files with a 'text' field")
    r.add_argument("--out", required=True, help="output JSONL file")
    r.add_argument("--piece-chars", type=int, default=8000, help="characters per piece (default: 8000)")
    r.add_argument("--passages", type=int, default=4, help="passages copied per piece (default: 4)")
    r.add_argument("--passage-chars", type=int, default=400, help="characters per passage (default: 400)")
    r.add_argument("--min-back", type=int, default=2000,
                   help="characters between a passage's source and the piece end (default: 2000)")
    r.add_argument("--random-lines", type=int, default=0,
                   help="made-up lines inserted early in each piece and copied (default: 0)")
    r.add_argument("--every", type=int, default=1, help="use every N-th document only (default: 1)")
    r.add_argument("--dense", type=int, default=0, help="write this many copy-dense documents instead")
    r.add_argument("--dense-lines", type=int, default=25, help="made-up lines per copy-dense document (default: 25)")
    r.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    r.set_defaults(func=_run_recall)

    c = corpora.add_parser(
        "pycode", help="a large Python corpus from installed packages (for pretraining on a GPU)",
        description="Collect the .py files of at least --min-bytes bytes of the named installed packages (one "
        "document per file; exact duplicates and files equal to a standard-library file dropped) into the JSONL "
        "file --out, with manifest.json (package versions) beside it.",
    )
    c.add_argument("--out", required=True, help="output JSONL file")
    c.add_argument("--packages", nargs="+", default=list(PACKAGES), help=f"packages (default: {' '.join(PACKAGES)})")
    c.add_argument("--min-bytes", type=int, default=8192, help="smallest .py file kept (default: 8192)")
    c.set_defaults(func=_run_pycode)

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
