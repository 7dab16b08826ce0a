"""Files on disk: the one atomic write, the one checksum helper, sealed result files and checkpoint metadata.

Everything that longmem writes goes through ``atomic_write`` (a temporary ``PATH.tmp-PID`` beside the
target, then ``os.replace``), so a reader sees the old file or the new one, never half of one; a writer
killed mid-save leaves only its temporary, which ``longmem.store`` cleans up.

A *sealed result* (``--json`` of every evaluation, ``demo``, ``perplexity``, ``staleness``) holds the
report plus ``longmem_version`` (the package that wrote it), ``format_version`` (``RESULT_FORMAT``) and
``sha256``: the hex sha256 of the canonical JSON (sorted keys, no spaces) of everything else in the
file. ``verify_result(path)`` checks it: a truncated or altered file is refused.

A *checkpoint* folder holds ``longmem.json`` (``CONFIG_FILE``: format, version, method, config, backbone
reference, the weights' sha256 and a sha256 of its own content) beside its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

from longmem.errors import LongMemError

__version__ = "0.1.0"

RESULT_FORMAT = 1  # layout of a sealed result file (see the module docstring); bump when it changes
SEAL = ("longmem_version", "format_version", "sha256")  # the keys write_result adds to a report

CHECKPOINT_VERSION = 1
CONFIG_FILE = "longmem.json"

_UMASK = os.umask(0o022)  # read once, at import: os.umask can only be read by setting it
os.umask(_UMASK)


# --------------------------------------------------------------------------- writing and hashing


def atomic_write(target: str | os.PathLike, write: Callable[[str], None], fsync: bool = True) -> None:
    """``write(tmp)`` fills a temporary file beside ``target``, which then replaces ``target`` in one step.
    ``fsync`` (default): the temporary is flushed to disk before the rename and the folder after it, so that a
    power loss leaves the old file or the new one (checkpoints, memories, results); False only for files that
    are cheap to make again."""
    tmp = f"{target}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # as open() would; some writers (safetensors) create their files 0600
        if fsync:
            fsync_path(tmp)
        os.replace(tmp, target)
        if fsync:
            fsync_path(Path(target).parent)  # the rename itself is durable only once its folder is
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file or a folder (its entries: renames, new files) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and folder under ``folder``, and ``folder`` itself, to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(root)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` into ``path`` atomically (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    """``obj`` as indented JSON in ``path``, atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def sha256_bytes(*parts: bytes) -> str:
    """sha256 of the concatenated ``parts``."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces, ASCII)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read 1 MiB at a time."""
    with open(path, "rb") as f:
        return sha256_bytes(*iter(lambda: f.read(1 << 20), b""))


def check_output(path, flag: str = "--json") -> None:
    """Refuse an output path that cannot be written, before any work is spent on it."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise LongMemError(f"{flag} {path} is a folder; give a file name")
    above = next((q for q in path.parents if q.exists()), None)
    if above is not None and not above.is_dir():
        raise LongMemError(f"{flag} {path}: {above} is a file, not a folder")


# --------------------------------------------------------------------------- sealed results


def write_result(path, report: dict) -> dict:
    """Write an evaluation report with its version and checksum (module docstring); returns what was written."""
    body = {k: v for k, v in report.items() if k not in SEAL}
    body = json.loads(json.dumps({**body, "longmem_version": __version__, "format_version": RESULT_FORMAT}))  # as read back
    body["sha256"] = sha256_json(body)
    write_json(path, body)
    return body


def verify_result(path) -> dict:
    """The report written to ``path`` by ``write_result`` (without the ``SEAL`` keys), once its checksum
    shows the file whole and unaltered.

    Raises:
        LongMemError: the file is missing, truncated, not JSON, unsealed, of an unknown format or altered.
    """
    path = Path(path)
    if not path.is_file():
        raise LongMemError(f"{path} is not a file; give a result file written by `longmem eval ... --json`")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LongMemError(f"{path} is truncated or not JSON ({e}); rerun the evaluation") from None
    if not isinstance(body, dict) or not isinstance(body.get("sha256"), str):
        raise LongMemError(f"{path} carries no checksum; it was not written by `longmem eval ... --json` (or by an older longmem): rerun the evaluation")
    if body.get("format_version") != RESULT_FORMAT:
        raise LongMemError(f"{path} has result format version {body.get('format_version')!r}, this longmem reads version "
                           f"{RESULT_FORMAT}; use the longmem that wrote it ({body.get('longmem_version', '?')})")
    want = body.pop("sha256")
    if sha256_json(body) != want:
        raise LongMemError(f"{path} is damaged or was edited: its contents do not match the checksum written with it; rerun the evaluation")
    return {k: v for k, v in body.items() if k not in SEAL}


# --------------------------------------------------------------------------- checkpoint metadata


def _meta_sha256(meta: dict) -> str:
    # the checkpoint's own layout (json.dumps with sort_keys, default separators), kept so old files verify
    return sha256_bytes(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())


def write_checkpoint_meta(path: Path, meta: dict) -> None:
    """Write ``longmem.json`` atomically with a sha256 over its own content (config, method, weights' checksum)."""
    meta = {**meta, "sha256": _meta_sha256(meta)}
    atomic_write(Path(path) / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))


def read_checkpoint_meta(path: Path) -> dict:
    """The checked content of a checkpoint folder's ``longmem.json``."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise LongMemError(f"{path} is not a LongMem checkpoint (no {CONFIG_FILE}); create one with `longmem train` or save_pretrained")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LongMemError(f"{path / CONFIG_FILE} is not valid JSON ({e}); the checkpoint is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != "longmem-checkpoint":
        raise LongMemError(f"{path / CONFIG_FILE} is not a LongMem checkpoint (its \"format\" is not \"longmem-checkpoint\")")
    version = meta.get("version")
    if version != CHECKPOINT_VERSION:
        newer = isinstance(version, int) and version > CHECKPOINT_VERSION
        fix = ("it was written by a newer longmem: upgrade longmem to load it" if newer else
               "no converter exists: load it with the longmem release that wrote it, or retrain with `longmem train`")
        raise LongMemError(f"{path / CONFIG_FILE} has checkpoint format version {version!r}, this longmem reads version {CHECKPOINT_VERSION}; {fix}")
    if "sha256" in meta and meta["sha256"] != _meta_sha256(meta):  # files written before this checksum have none
        raise LongMemError(f"{path / CONFIG_FILE} is damaged (checksum mismatch): its settings were altered after it was written; "
                           f"restore it or retrain")
    return meta
