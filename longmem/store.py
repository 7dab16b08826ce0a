"""Named, persistent memories: read a book or a code base once, use it today or next week.

A store is a folder (``$LONGMEM_HOME``, else ``$XDG_DATA_HOME/longmem``, else
``~/.local/share/longmem``) holding ``memories/NAME.safetensors``, each a one-row ``MemoryBank``
tied to the model that built it (its fingerprint is checked on every load). Saving is atomic (a new
file is completed, then renamed over the old one), and writers take an exclusive lock, so a crash
or a second writer can never leave a broken memory. Loading reads safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from longmem.errors import LongMemError
from longmem.memory import MemoryBank
from longmem.tokens import encode

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Files are read in pieces of about this size, never whole. Tokenizing a piece briefly takes ~150x its
# size (the tokenizer's per-byte alignments and per-token strings): ~9 MiB at 64 KiB, ~160 MiB at 1 MiB.
READ_BYTES = 1 << 16


def default_home() -> Path:
    if os.environ.get("LONGMEM_HOME"):
        return Path(os.environ["LONGMEM_HOME"])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "longmem"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:  # fullmatch: "$" lets "x\n" through
        raise LongMemError(
            f"invalid memory name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class MemoryStore:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_home()
        self.dir = self.root / "memories"
        for d in (self.root, self.dir):
            if d.exists() and not d.is_dir():
                raise LongMemError(f"memory store {d} is not a folder; pass --home DIR (or set LONGMEM_HOME) to a folder")

    def path(self, name: str) -> Path:
        return self.dir / f"{check_name(name)}.safetensors"

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def names(self) -> list[str]:
        if not self.dir.is_dir():
            return []
        return sorted(p.name[: -len(".safetensors")] for p in self.dir.glob("*.safetensors") if NAME_RE.fullmatch(p.name[: -len(".safetensors")]))

    @contextlib.contextmanager
    def lock(self, name: str):
        """Exclusive writer lock on one memory; a second writer is refused at once.

        The lock file exists only while it is held (it names the holder). Removing it on release is
        safe because a locker checks, once it holds the lock, that the file it locked is still the
        one at the path; if a releasing holder removed it in between, it tries again.
        """
        lock_path = self.dir / f"{check_name(name)}.lock"
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            f = open(lock_path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise LongMemError(f"memory {name!r} is being written by {holder}; wait for it to finish and try again") from None
            try:
                if os.stat(lock_path).st_ino == os.fstat(f.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            f.close()  # we locked a file its holder has just removed: take the new one
        try:
            f.seek(0)
            f.truncate()
            f.write(f"process {os.getpid()}")
            f.flush()
            yield
        finally:
            with contextlib.suppress(OSError):
                lock_path.unlink()  # while still held: no other process can be between lock and check
            f.close()  # closing releases the lock

    def load(self, name: str, model) -> MemoryBank:
        path = self.path(name)
        if not path.is_file():
            raise LongMemError(f"no memory named {name!r} in {self.dir}; create it with `longmem memory add {name} FILE`")
        return model.load_memory(path)

    def save(self, name: str, bank: MemoryBank) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path(name))
        bank.save(self.path(name))
        fsync_dir(self.dir)  # the rename itself is on disk too: a saved memory survives a power cut

    def header(self, name: str) -> dict:
        path = self.path(name)
        if not path.is_file():
            raise LongMemError(f"no memory named {name!r} in {self.dir}")
        try:
            with safe_open(str(path), framework="pt") as f:
                header = json.loads((f.metadata() or {})["longmem"])
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            raise LongMemError(f"memory {name!r} ({path}) is unreadable ({type(e).__name__}); remove it with `longmem memory remove {name}`") from None
        st = path.stat()
        header["bytes"] = st.st_size
        header["modified"] = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc).isoformat(timespec="seconds")
        return header

    def remove(self, name: str) -> None:
        path = self.path(name)
        if not path.is_file():
            raise LongMemError(f"no memory named {name!r} in {self.dir}")
        with self.lock(name):
            path.unlink()


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a file renamed into it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(path: Path) -> None:
    """Delete PATH.tmp-PID files that a writer killed mid-save left behind (PID no longer running)."""
    for tmp in path.parent.glob(f"{path.name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
        except OSError:  # exists, owned by someone else
            pass


def check_text_file(path: Path) -> None:
    if not path.is_file():
        raise LongMemError(f"{path} is not a file")
    with open(path, "rb") as f:
        head = f.read(8192)
    if not head:
        raise LongMemError(f"{path} is empty; nothing to add")
    if b"\0" in head:
        raise LongMemError(f"{path} looks binary (it has NUL bytes); add UTF-8 text files")


def read_pieces(path: Path, size: int = READ_BYTES):
    """The file's text in pieces of about ``size`` bytes, cut after a newline (undecodable bytes replaced)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        yield from cut_pieces(iter(lambda: f.read(size), ""))


def text_pieces(text: str, size: int = READ_BYTES):
    """A string in the pieces ``read_pieces`` makes of a file holding it (so both give the same tokens)."""
    yield from cut_pieces(text[i:i + size] for i in range(0, len(text), size))


def cut_pieces(blocks):
    """Blocks of text re-cut after their last newline (when it is in the second half), so no word is split."""
    carry = ""
    for block in blocks:
        text = carry + block
        cut = text.rfind("\n")
        if cut < 0 or cut < len(text) // 2:
            carry, text = "", text
        else:
            carry, text = text[cut + 1:], text[: cut + 1]
        if text:
            yield text
    if carry:
        yield carry


def ingest_file(model, tokenizer, bank: MemoryBank, path: Path, row: int = 0, progress=None) -> int:
    """Write one file into a memory row, segment by segment, through the backbone up to block m.

    The file is read in pieces, so a file of any size streams in bounded RAM (the bank itself is
    bounded by its FIFO). Returns the number of tokens written.
    """
    return ingest_pieces(model, tokenizer, bank, read_pieces(path), row, progress)


def ingest_text(model, tokenizer, bank: MemoryBank, text: str, row: int = 0) -> int:
    """``ingest_file`` for text already in hand: the same tokens as a file holding ``text``."""
    return ingest_pieces(model, tokenizer, bank, text_pieces(text), row)


def ingest_pieces(model, tokenizer, bank: MemoryBank, pieces, row: int = 0, progress=None) -> int:
    """Tokenize pieces of text and write them into a memory row, one segment at a time. Returns the tokens written."""
    T = model.segment_length
    buffer = np.zeros(0, dtype=np.int64)
    total = 0
    for piece in pieces:
        ids = encode(tokenizer, piece)
        buffer = np.concatenate([buffer, ids])
        while len(buffer) >= T:
            model.write_memory(torch.as_tensor(buffer[:T]).view(1, -1), bank, rows=[row])
            buffer = buffer[T:]
            total += T
            if progress is not None:
                progress.update(T)
        if progress is not None:
            progress.set_postfix(tokens=total)
    if len(buffer):
        model.write_memory(torch.as_tensor(buffer).view(1, -1), bank, rows=[row])
        total += len(buffer)
        if progress is not None:
            progress.update(len(buffer))
    return total
