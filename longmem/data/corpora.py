"""Long documents on disk, reproducibly: corpora, readers and the BPE tokenizer.

Two corpora of long documents (what LongMem needs: text whose context outruns the window):

``books``  Jane Austen's six novels, from the Debian package ``r-cran-janeaustenr`` (an R lazy-load
           database, ``data/Rdata.rdb`` + ``Rdata.rdx``, decoded without R by the ``rdata``
           package). One novel is one document; the split is by whole novel and fixed:

               train       Sense and Sensibility, Pride and Prejudice, Mansfield Park,
                           Northanger Abbey
               validation  Persuasion
               test        Emma

``code``   The ``.py`` files of the running interpreter's standard library of 20 KB and more
           (``sysconfig.get_paths()["stdlib"]``, without site-packages, test suites, idlelib,
           lib2to3, ensurepip, turtledemo and pydoc_data). One file is one document; the split
           is by ``int(sha1(relative path), 16) % 100``: < 90 train, 90-94 validation, >= 95 test.

Both are written as ``OUT/<corpus>/<split>.jsonl`` (one ``{"id", "text"}`` object a line) plus
``OUT/<corpus>/manifest.json`` (documents and characters per split, the split rule). Files are
sorted, so the output is byte-identical from run to run on the same inputs.

Text policy: files are decoded as UTF-8 with ``errors="replace"`` (an invalid byte becomes
U+FFFD, never an exception); a file with a NUL byte in its first 8 KB is treated as binary.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sysconfig
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from longmem.errors import LongMemError
from longmem.io import atomic_write

EOT = "<|endoftext|>"  # the one special token: document separator, bos, eos and pad
MAX_VOCAB = 2**31 - 1  # token ids are stored as int32

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA = Path("/usr/lib/R/site-library/janeaustenr/data")  # where an installed package keeps the novels
# R variable name in the package -> (title, split). Fixed: change it and every number moves.
AUSTEN_NOVELS = {
    "sensesensibility": ("Sense and Sensibility", "train"),
    "prideprejudice": ("Pride and Prejudice", "train"),
    "mansfieldpark": ("Mansfield Park", "train"),
    "northangerabbey": ("Northanger Abbey", "train"),
    "persuasion": ("Persuasion", "validation"),
    "emma": ("Emma", "test"),
}
AUSTEN_SPLIT_RULE = "by novel: train = " + ", ".join(
    t for t, s in AUSTEN_NOVELS.values() if s == "train"
) + "; validation = Persuasion; test = Emma"

CODE_MIN_BYTES = 20_000
# stdlib folders that are not ordinary library code (tests, bundled apps, generated data)
CODE_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip",
     "turtledemo", "pydoc_data", "__pycache__"}
)
CODE_SPLIT_RULE = (
    "by file: int(sha1(relative path).hexdigest(), 16) % 100: < 90 train, 90-94 validation, "
    ">= 95 test; .py files >= 20000 bytes"
)
SPLITS = ("train", "validation", "test")

_BINARY_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class Document:
    """One long text: a novel, a source file, a row of a dataset."""

    id: str
    text: str


# --------------------------------------------------------------------------- reading text


def _looks_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        return b"\0" in f.read(_BINARY_SNIFF_BYTES)


def _read_text(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")  # policy: see module docstring


def _iter_jsonl(path: Path) -> Iterator[Document]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LongMemError(
                    f"{path}:{lineno} is not valid JSON ({e.msg}); a .jsonl file needs one JSON "
                    "object per line"
                ) from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise LongMemError(
                    f'{path}:{lineno} has no string "text" field; each line must be like '
                    '{"id": "...", "text": "..."}'
                )
            yield Document(id=str(row.get("id", f"{path.name}:{lineno}")), text=row["text"])


def _iter_hf(spec: str) -> Iterator[Document]:
    name, _, split = spec[len("hf:"):].partition(":")
    split = split or "train"
    if not name:
        raise LongMemError(f"{spec!r} names no dataset; write hf:NAME or hf:NAME:SPLIT")
    try:
        import datasets
    except ImportError:
        raise LongMemError(
            f"{spec!r} needs the HuggingFace datasets package; pip install datasets"
        ) from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all say the same to the user
        raise LongMemError(
            f"could not load HuggingFace dataset {name!r} split {split!r} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the name "
            "and split, and that the hub is reachable (or the dataset is cached)"
        ) from None
    if "text" not in ds.column_names:
        raise LongMemError(
            f"HuggingFace dataset {name!r} has no 'text' column (columns: {ds.column_names})"
        )
    for i, row in enumerate(ds):
        yield Document(id=f"{name}:{split}:{i}", text=row["text"])


def iter_documents(path: str | os.PathLike) -> Iterator[Document]:
    """Yield the documents found at ``path``.

    Args:
        path: a text file (one document), a ``.jsonl`` file (one document per line, ``text``
            field), a folder (every text file below it, recursively and sorted by path; binary
            and hidden files are skipped; ``.jsonl`` files are expanded), or ``hf:NAME[:SPLIT]``
            for a HuggingFace dataset with a ``text`` column (needs ``datasets``).

    Raises:
        LongMemError: the path is missing, a single file is binary, or a folder holds no text.
    """
    spec = str(path)
    if spec.startswith("hf:"):
        yield from _iter_hf(spec)
        return
    p = Path(path)
    if not p.exists():
        raise LongMemError(f"{p} does not exist; give a text file, a .jsonl, a folder or hf:NAME")
    if p.is_file():
        if p.suffix == ".jsonl":
            yield from _iter_jsonl(p)
        elif _looks_binary(p):
            raise LongMemError(f"{p} looks binary (it has NUL bytes); give a UTF-8 text file")
        else:
            yield Document(id=p.name, text=_read_text(p))
        return
    found = False
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        rel = f.relative_to(p)
        if any(part.startswith(".") for part in rel.parts) or _looks_binary(f):
            continue
        found = True
        if f.suffix == ".jsonl":
            yield from _iter_jsonl(f)
        else:
            yield Document(id=rel.as_posix(), text=_read_text(f))
    if not found:
        raise LongMemError(f"folder {p} holds no text files; point --data at text or .jsonl files")


def text_pieces(text: str, piece_chars: int = 65536) -> Iterator[str]:
    """Cut ``text`` after newlines into pieces of about ``piece_chars`` characters.

    Tokenizers choke on one huge string (25 s and 4 GB for 23 MB); pieces that end at a newline
    tokenize (almost) as the whole would, and can be batched.
    """
    start = 0
    while start < len(text):
        end = start + piece_chars
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl > start else end
        yield text[start:end]
        start = end


# --------------------------------------------------------------------------- corpora


def read_austen_rdata(data_dir: str | os.PathLike) -> dict[str, str]:
    """Read the six novels from the R lazy-load database of ``janeaustenr``.

    Args:
        data_dir: the package's ``data/`` folder, holding ``Rdata.rdx`` (gzip'd RDS: an index
            name -> (offset, length)) and ``Rdata.rdb`` (each entry a 4-byte big-endian length,
            then a zlib stream of an RDS character vector, one element per line of the book).

    Returns:
        R variable name (e.g. ``"emma"``) -> text: its lines joined with newlines, leading blank
        lines stripped.
    """
    import rdata

    d = Path(data_dir)
    rdx, rdb = d / "Rdata.rdx", d / "Rdata.rdb"
    for f in (rdx, rdb):
        if not f.is_file():
            raise LongMemError(f"{f} is missing; expected the data/ folder of {AUSTEN_PACKAGE}")

    def parse(raw: bytes):
        with warnings.catch_warnings():  # rdata warns "assumed RDS" for headerless streams
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    try:
        index = parse(gzip.decompress(rdx.read_bytes()))
        blob = rdb.read_bytes()
        novels = {}
        for name, (offset, length) in index["variables"].items():
            entry = blob[int(offset): int(offset) + int(length)]
            (size,) = struct.unpack(">i", entry[:4])
            raw = zlib.decompress(entry[4:])
            if len(raw) != size:
                raise ValueError(f"entry {name}: {len(raw)} bytes, header says {size}")
            lines = [str(x) for x in parse(raw)]
            novels[str(name)] = "\n".join(lines).lstrip("\n").strip(" ")
    except LongMemError:
        raise
    except Exception as e:
        raise LongMemError(
            f"could not decode the R data in {d} ({type(e).__name__}: {e}); is it the data/ "
            f"folder of {AUSTEN_PACKAGE}?"
        ) from None
    return novels


def austen_splits(novels: dict[str, str]) -> dict[str, list[Document]]:
    """Split the novels by the fixed rule in ``AUSTEN_NOVELS``."""
    missing = sorted(set(AUSTEN_NOVELS) - set(novels))
    if missing:
        raise LongMemError(f"the R data lacks novels {missing}; expected {sorted(AUSTEN_NOVELS)}")
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for name, (title, split) in AUSTEN_NOVELS.items():  # fixed order
        splits[split].append(Document(id=title, text=novels[name]))
    return splits


def fetch_austen(workdir: str | os.PathLike) -> Path:
    """``apt-get download`` the janeaustenr package into ``workdir``, unpack it, return its data/."""
    work = Path(workdir)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise LongMemError("the books corpus needs apt-get and dpkg-deb (a Debian/Ubuntu system)")
    r = subprocess.run(["apt-get", "download", AUSTEN_PACKAGE], cwd=work, capture_output=True,
                       text=True)
    debs = sorted(work.glob(f"{AUSTEN_PACKAGE}_*.deb"))
    if not debs:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise LongMemError(
            f"apt-get download {AUSTEN_PACKAGE} failed ({last}); run apt-get update, or give an "
            "unpacked package with --austen-dir"
        )
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(work / "root")], check=True)
    found = sorted((work / "root").rglob("janeaustenr/data/Rdata.rdx"))
    if not found:
        raise LongMemError(f"{debs[0].name} holds no janeaustenr/data/Rdata.rdx")
    return found[0].parent


def code_split(rel_path: str) -> str:
    """The split of a stdlib file, from a stable hash of its relative path."""
    bucket = int(hashlib.sha1(rel_path.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def code_splits(root: str | os.PathLike | None = None,
                min_bytes: int = CODE_MIN_BYTES) -> dict[str, list[Document]]:
    """The standard library's large ``.py`` files, split by ``code_split``.

    Args:
        root: the stdlib folder; default the running interpreter's.
        min_bytes: smallest file kept (long documents only).
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise LongMemError(f"{root} is not a folder; give the Python standard library folder")
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root)
        if any(part in CODE_EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        if f.stat().st_size < min_bytes or _looks_binary(f):
            continue
        splits[code_split(rel.as_posix())].append(Document(id=rel.as_posix(), text=_read_text(f)))
    if not splits["train"]:
        raise LongMemError(f"no .py files of {min_bytes} bytes or more under {root}")
    return splits


def _atomic_write_text(path: Path, write) -> None:
    """``write(f)`` fills a text file that replaces ``path`` in one step (``longmem.io.atomic_write``)."""
    def fill(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)

    atomic_write(path, fill)


def write_corpus(out: str | os.PathLike, corpus: str, splits: dict[str, list[Document]],
                 source: str, split_rule: str) -> Path:
    """Write ``OUT/<corpus>/<split>.jsonl`` and ``manifest.json`` (last, so its presence means
    the corpus is complete). Each file goes to a temporary name first, then ``os.replace``."""
    folder = Path(out) / corpus
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "manifest.json"
    manifest_path.unlink(missing_ok=True)
    counts = {}
    for split, docs in splits.items():
        def write(f, docs=docs):
            for d in docs:
                f.write(json.dumps({"id": d.id, "text": d.text}, ensure_ascii=False) + "\n")
        _atomic_write_text(folder / f"{split}.jsonl", write)
        counts[split] = {"documents": len(docs), "characters": sum(len(d.text) for d in docs),
                         "ids": [d.id for d in docs] if len(docs) <= 10 else None}
    manifest = {"corpus": corpus, "source": source, "split_rule": split_rule, "splits": counts,
                "text_policy": "UTF-8, errors='replace'"}
    _atomic_write_text(manifest_path, lambda f: json.dump(manifest, f, indent=2))
    return folder


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(paths: Iterable[str | os.PathLike], vocab_size: int = 8192,
                    out: str | os.PathLike | None = None, show_progress: bool = False):
    """Train a byte-level BPE on the documents at ``paths``.

    Returns a ``transformers.PreTrainedTokenizerFast`` with ``<|endoftext|>`` as bos, eos and pad
    (id 0). With ``out`` it is saved there (``save_pretrained``; written to a temporary folder,
    then moved), loadable by ``AutoTokenizer.from_pretrained(out)``.
    """
    if vocab_size < 257 + 1:
        raise LongMemError(f"--vocab-size {vocab_size} is too small; byte-level BPE needs >= 258")
    if vocab_size > MAX_VOCAB:
        raise LongMemError(f"--vocab-size {vocab_size} is too large; token ids are int32, so at most {MAX_VOCAB}")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise LongMemError(f"--out {out} is not a folder; give a folder for the tokenizer files")
    paths = list(paths)
    n_chars = 0

    def pieces() -> Iterator[str]:
        nonlocal n_chars
        for path in paths:
            for doc in iter_documents(path):
                n_chars += len(doc.text)
                yield from text_pieces(doc.text)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(pieces(), trainer=trainer)
    if n_chars == 0:
        raise LongMemError(f"no text in {[str(p) for p in paths]}; the tokenizer needs training text")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT,
                                   pad_token=EOT, unk_token=None, model_max_length=2048)
    if out is not None:
        out = Path(out)
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        fast.save_pretrained(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
        tmp.rmdir()
    return fast
