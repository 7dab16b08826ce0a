"""LongMem = frozen backbone + memory bank + SideNet (paper figure 2).

| paper        | here                                   |
|--------------|----------------------------------------|
| m            | ``config.memory_layer``                |
| csz          | ``config.chunk_size``                  |
| M            | ``config.memory_size``                 |
| k_c, K       | ``config.topk_chunks``, k_c * csz      |
| g            | ``sidenet.gate`` (one logit per head)  |
| SideNet L_s  | ``sidenet.num_layers`` = L // 2        |
| j            | ``sidenet.memory_index`` = (m - 1) / 2 |

One call of ``forward`` processes one segment (B, T) of B independent streams: the frozen backbone
encodes it, the SideNet reads the backbone's hidden states and retrieves from each row's memory, and
only then is the segment's block-m key/value written to the memory (write after read, section 3.7).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from longmem.backbone import Backbone, load_causal_lm, to_dtype
from longmem.cache import WindowCache
from longmem.config import LongMemConfig, default_memory_layer
from longmem.dtypes import parse_dtype
from longmem.errors import LongMemError
from longmem.generation import generate
from longmem.gguf import resolve_reference
from longmem.io import CHECKPOINT_VERSION, atomic_write, file_sha256, read_checkpoint_meta, write_checkpoint_meta
from longmem.memory import MemoryBank
from longmem.sidenet import SideNet

WEIGHTS_FILE = "sidenet.safetensors"
IGNORE = -100  # label of a position that is not scored (HF convention)


@dataclass
class LongMemOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None  # mean next-token cross-entropy over labels != -100


class MemoryLM(nn.Module):
    """The model protocol: everything a caller (training, the evaluations, the decoder, the server) uses of a
    model, and all it may use. LongMem, the baselines and the plain backbone (``longmem.baselines``) implement it;
    callers ask the protocol, never a model's class.

    | member                                              | what it gives                                          |
    |-----------------------------------------------------|--------------------------------------------------------|
    | ``forward(ids, memory=, labels=, update_memory=, cache=)`` | ``LongMemOutput``: the window's logits (B, T, V)  |
    |                                                     | (and loss); with ``cache`` the tokens extend the window |
    | ``new_cache()``                                     | an empty ``WindowCache`` for one local window           |
    | ``new_memory(B, ...)``, ``load_memory``, ``check_memory`` | a memory bank this model reads (one row per stream) |
    | ``write_memory(ids, memory)``, ``memory_entries(ids)`` | what the model writes into a memory                  |
    | ``trainable_parameters()``                          | the trainable state (the SideNet, or the trained blocks) |
    | ``trainable_module``                                | the module whose weights ``save_pretrained(state=)`` takes |
    |                                                     | (LongMem's SideNet), or None (the model saves itself)   |
    | ``gate``                                            | (H,) memory gate logits, or None (no memory)           |
    | ``frozen_backbone``                                 | the untrained backbone (the paper's baseline mode)     |
    | ``backbone_logits(ids)``                            | its logits for one window                              |
    | ``decode_into_memory``                              | see below                                              |
    | ``segment_length``, ``memory_layer``, ``device``, ``dtype``, ``memory_info()`` | sizes and identity  |

    ``decode_into_memory``: whether the harness's generation lets the local window slide into the memory (LongMem,
    as the paper generates: half the window at a time, the memory written) or moves it one token at a time with
    the memory only read, which equals recomputing the last window per token (the baselines and the plain
    backbone, as they have always been evaluated; kept so that their figures stand).

    Subclasses set ``self.config`` (a LongMemConfig with memory_layer resolved) and ``self.backbone``, and
    implement ``forward``.
    """

    method = "base"
    decode_into_memory = False

    @property
    def memory_layer(self) -> int:
        return self.config.memory_layer

    @property
    def segment_length(self) -> int:
        """T, the local window used when streaming documents."""
        if self.config.segment_length is not None:
            return self.config.segment_length
        return min(1024, self.backbone.max_positions)  # sliding-window layers apply their own window inside

    @property
    def frozen_backbone(self) -> Backbone:
        """The backbone as it was before any training (LongMem's is its own: it never trains)."""
        return self.backbone

    @property
    def trainable_module(self) -> nn.Module | None:
        """The module that holds all the trainable state, when one does (see the table above)."""
        return None

    @property
    def device(self) -> torch.device:
        return next(self.backbone.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.model.parameters()).dtype

    def new_cache(self) -> WindowCache:
        """An empty KV cache for one local window (incremental decoding with ``forward(..., cache=)``)."""
        return WindowCache(self.backbone.num_layers, 0, self.segment_length, self.memory_layer)

    def memory_info(self) -> dict:
        """What a memory built by this model records, and what ``forward`` checks before using one."""
        return {"model": self.backbone.name, "fingerprint": self.backbone.fingerprint(), "memory_layer": self.memory_layer}

    def new_memory(self, batch_size: int = 1, *, memory_size: int | None = None, chunk_size: int | None = None,
                   topk_chunks: int | None = None, backend: str | None = None, device=None, dtype=None,
                   index: str = "flat", nprobe: int = 64) -> MemoryBank:
        """An empty memory bank with one isolated memory per row. Sizes default to the config's; k_c is not the
        memory's but the config's, read at every search, unless ``topk_chunks`` gives this memory its own.
        ``index="ivf"``: approximate search for very large memories (see ``MemoryBank``)."""
        return MemoryBank(
            batch_size=batch_size,
            num_heads=self.backbone.num_kv_heads,
            head_dim=self.backbone.head_dim,
            chunk_size=self.config.chunk_size if chunk_size is None else chunk_size,
            memory_size=self.config.memory_size if memory_size is None else memory_size,
            topk_chunks=topk_chunks,  # None: the config's, at every search
            dtype=dtype or self.dtype,
            device=device or self.device,
            backend=backend or self.config.retrieval_backend,
            info=self.memory_info(),
            index=index,
            nprobe=nprobe,
            metric=self.config.retrieval_metric,
        )

    def load_memory(self, path, device=None) -> MemoryBank:
        """Load a memory saved with ``MemoryBank.save``, refusing one built by another model."""
        return MemoryBank.load(path, device=device or self.device, expect=self.memory_info())

    @torch.no_grad()
    def write_memory(self, input_ids: torch.Tensor, memory: MemoryBank, rows=None) -> None:
        """Write tokens into a memory without scoring them, one local window at a time, oldest first.

        LongMem's memory holds the frozen backbone's block-m keys/values, which do not depend on the
        SideNet: only the backbone runs, up to block m.

        Args:
            input_ids: (R, n) token ids, any n; R = 1 writes the same tokens to every row of ``rows``.
            memory: the bank to write to.
            rows: which memory rows (default: all of them).
        """
        R = memory.batch_size if rows is None else len(rows)
        if input_ids.dim() != 2 or input_ids.shape[0] not in (1, R):
            raise LongMemError(f"write_memory takes (1 or {R}, tokens) ids for {R} memory row(s), got shape {tuple(input_ids.shape)}")
        T = self.segment_length
        for start in range(0, input_ids.shape[1], T):
            keys, values = self.memory_entries(input_ids[:, start:start + T])
            memory.add(keys.expand(R, -1, -1, -1), values.expand(R, -1, -1, -1), rows=rows)  # (R, Hkv, t, Dh)

    @torch.no_grad()
    def memory_entries(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What writing one segment to a memory stores: the frozen backbone's block-m keys (pre-rotary) and values.

        They depend on the backbone alone, so they can be computed once and added to many memories
        (``memory.add(keys, values)``).

        Args:
            input_ids: (R, t) token ids, t <= the backbone's context.
        Returns:
            keys, values: (R, Hkv, t, Dh) each.
        """
        seg = input_ids.to(self.device)
        self.check_inputs(seg)
        kv = self.backbone(seg, self.memory_layer, upto=self.memory_layer)
        return kv.keys, kv.values

    @torch.no_grad()
    def backbone_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The frozen backbone's own logits for a segment (the paper's baseline), (B, T, V)."""
        self.check_inputs(input_ids, None, None)
        bb = self.frozen_backbone(input_ids, self.memory_layer)
        return self.frozen_backbone.logits(bb.hidden_states[-1])

    def check_inputs(self, input_ids, labels=None, memory=None) -> None:
        """Raise a LongMemError that says what is wrong with a segment (shape, ids, length), its labels or its memory."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int16):
            got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise LongMemError(f"input_ids must be an integer tensor of shape (batch, tokens), got {got}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise LongMemError(f"input_ids is empty (shape {tuple(input_ids.shape)})")
        vocab = self.backbone.vocab_size
        lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one device sync per call
        if lo < 0 or hi >= vocab:
            raise LongMemError(f"token ids must lie in [0, {vocab}) for this model, got values in [{lo}, {hi}]; was the text encoded with this model's tokenizer?")
        limit = self.backbone.max_positions
        if T > limit:
            raise LongMemError(f"segment of {T} tokens is longer than the backbone's context ({limit}); split the stream into segments of at most {limit} tokens")
        if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise LongMemError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
        if memory is not None:
            self.check_memory(memory, B)

    def check_memory(self, memory, B: int) -> None:
        """The memory has B rows and was built by this model (same backbone fingerprint and layer)."""
        if not isinstance(memory, MemoryBank):
            raise LongMemError(f"memory must be a longmem.MemoryBank (see model.new_memory), got {type(memory).__name__}")
        if memory.batch_size != B:
            raise LongMemError(f"memory has {memory.batch_size} rows but input_ids has {B}; one memory row per batch row")
        mine = self.memory_info()
        for key in ("fingerprint", "memory_layer"):
            if memory.info.get(key) != mine[key]:
                raise LongMemError(
                    f"this memory belongs to another model ({key}: memory has {memory.info.get(key)!r}, "
                    f"model has {mine[key]!r}); build a new memory with model.new_memory()"
                )
        if (memory.num_heads, memory.head_dim) != (self.backbone.num_kv_heads, self.backbone.head_dim):
            raise LongMemError("memory head layout does not match this model; build a new memory with model.new_memory()")
        if memory.metric != self.config.retrieval_metric:
            raise LongMemError(f"this memory ranks chunks by {memory.metric!r} but the model was trained to retrieve by "
                               f"{self.config.retrieval_metric!r}; build a new memory with model.new_memory()")

class LongMem(MemoryLM):
    """A LongMem language model. Build with ``from_backbone`` or ``from_pretrained``."""

    method = "longmem"
    decode_into_memory = True

    def __init__(self, backbone: Backbone, config: LongMemConfig, sidenet: SideNet | None = None):
        super().__init__()
        self.config = resolve_config(config, backbone.num_layers, backbone.max_positions)
        self.backbone = backbone
        self.sidenet = sidenet if sidenet is not None else SideNet(backbone, self.config.memory_layer, self.config.sidenet_init)

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_backbone(cls, model_or_path, config: LongMemConfig | None = None, *, dtype=None, **overrides) -> "LongMem":
        """Wrap an HF causal LM (instance, local folder or hub id); the SideNet is initialised from it.

        ``dtype`` (torch.bfloat16 or "bf16", ...): load the frozen backbone in that type (an instance is converted
        in place), e.g. bf16 to halve a real backbone's memory; the SideNet stays float32 (it trains, and runs,
        under autocast). ``from_pretrained(..., dtype=)`` converts the whole model for inference.
        """
        config = (config or LongMemConfig()).replace(**overrides) if overrides else (config or LongMemConfig())
        model = cls(Backbone(load_causal_lm(model_or_path, dtype)), config)
        if dtype is not None:
            model.sidenet.float()
        return model

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.train(False)  # the backbone never leaves eval mode
        return self

    def trainable_parameters(self):
        return [p for p in self.sidenet.parameters() if p.requires_grad]

    @property
    def trainable_module(self) -> SideNet:
        return self.sidenet

    @property
    def gate(self) -> nn.Parameter:
        """(H,) the SideNet's memory gate logits."""
        return self.sidenet.gate

    def new_cache(self) -> WindowCache:
        """An empty KV cache for one local window: the backbone's and the SideNet's."""
        return WindowCache(self.backbone.num_layers, self.sidenet.num_layers, self.segment_length, self.memory_layer)

    # -- forward -----------------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, memory: MemoryBank | None = None, labels: torch.Tensor | None = None,
                update_memory: bool = True, cache: WindowCache | None = None,
                logits_at: torch.Tensor | None = None) -> LongMemOutput:
        """One segment of B streams.

        Args:
            input_ids: (B, T) token ids, T <= the backbone's context.
            memory: the rows' memory bank (B rows), or None for the SideNet without memory.
            labels: (B, T) as in HF causal LMs: shifted inside, -100 ignored.
            update_memory: write this segment's block-m keys/values to ``memory`` after reading it.
            cache: the window's earlier tokens (``new_cache``), extended in place; the new tokens take
                the positions after them (incremental decoding).
            logits_at: (B, T) bool: compute logits only at these positions (the scored ones, when training scores
                a few); they come back as (1, N, V) in row-major order. Not with ``labels``.
        Returns:
            LongMemOutput with logits (B, T, V) and loss (when labels are given).
        """
        if logits_at is not None and (labels is not None or logits_at.shape != input_ids.shape):
            raise LongMemError("logits_at must be a (B, T) mask like input_ids, and cannot be given with labels")
        self.check_inputs(input_ids, labels, memory)
        start = len(cache) if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        bb = self.backbone(input_ids, self.memory_layer, positions, cache=None if cache is None else cache.backbone)  # frozen
        logits = self.sidenet(self.backbone, bb.hidden_states, bb.layer_inputs, self.retriever(memory, bb.keys),
                              cache=None if cache is None else cache.sidenet, logits_at=logits_at)
        if memory is not None and update_memory:
            memory.add(bb.keys, bb.values)  # write after read: a segment never retrieves itself
        return LongMemOutput(logits=logits, loss=None if labels is None else next_token_loss(logits, labels))

    def retriever(self, memory: MemoryBank | None, keys: torch.Tensor):
        """The memory layer's ``retrieve(q_raw)``: None without memory; the search by ``config.retrieval_query``.

        ``keys``: (B, Hkv, T, Dh) the backbone's block-m keys (pre-rotary) of the same tokens, used as the search
        query when ``retrieval_query == "key"``.
        """
        if memory is None:
            return None
        nxt, k = self.config.retrieval_next, self.config.topk_chunks  # k_c: the config's, whatever memory is read
        if self.config.retrieval_query == "query":
            return lambda q_raw: memory.search(q_raw, next_chunks=nxt, topk_chunks=k)

        def retrieve(q_raw: torch.Tensor):
            return memory.search(keys, next_chunks=nxt, topk_chunks=k).repeat_heads(q_raw.shape[1] // keys.shape[1])

        return retrieve

    def generate(self, input_ids: torch.Tensor, memory: MemoryBank | None = None, **kwargs) -> torch.Tensor:
        """Greedy or sampled continuation with memory and a KV cache; see ``longmem.generation.generate``."""
        return generate(self, input_ids, memory=memory, **kwargs)

    # -- persistence -------------------------------------------------------------------------------

    def save_pretrained(self, path, save_backbone: bool = False, tokenizer=None, state: dict | None = None,
                        only: list[str] | None = None, dtype=None, backbone_ref: str | None = None) -> None:
        """Save the SideNet (the only trained part) and the config; the backbone by reference.

        ``save_backbone=True`` also writes the backbone (and ``tokenizer``) into ``path/backbone`` so
        the folder is self-contained and relocatable. ``state``: the SideNet weights to write instead of
        ``sidenet.state_dict()`` (distributed training passes them gathered from the shards, LoRA merged).
        ``only``: write just these SideNet tensors (those that trained); loading rebuilds the others from the
        backbone as the config's initialisation makes them. ``dtype``: store the tensors in this type (e.g. bf16).
        ``backbone_ref``: the reference to record instead of the backbone's path (e.g. a ``package:`` reference).
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if save_backbone:
            self.backbone.model.save_pretrained(path / "backbone")
            if tokenizer is not None:
                tokenizer.save_pretrained(path / "backbone")
            ref = "backbone"
        elif backbone_ref is not None:
            ref = backbone_ref
        else:
            name = self.backbone.name
            ref = os.path.abspath(name) if os.path.isdir(name) else name
        meta = {
            "format": "longmem-checkpoint",
            "version": CHECKPOINT_VERSION,
            "method": self.method,
            "config": self.config.to_dict(),
            "backbone": {"path": ref, "model_type": self.backbone.model_type, "fingerprint": self.backbone.fingerprint(),
                         "dtype": str(self.backbone.dtype).removeprefix("torch.")},  # the type the fingerprint was taken in
        }
        state = state or self.sidenet.state_dict()
        if only is not None:
            unknown = sorted(set(only) - set(state))
            if unknown:
                raise LongMemError(f"cannot save SideNet tensors {unknown[:3]}: the SideNet has no such tensors")
            state = {k: state[k] for k in only}
            meta["partial"] = True  # the other tensors come from the backbone, as initialised
        store = parse_dtype(dtype)
        state = {k: (v if store is None else v.to(store)).detach().contiguous().cpu() for k, v in state.items()}
        atomic_write(path / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "longmem-sidenet"}))
        meta["weights_sha256"] = file_sha256(path / WEIGHTS_FILE)
        write_checkpoint_meta(path, meta)

    @classmethod
    def from_pretrained(cls, path, backbone=None, dtype=None, *, meta: dict | None = None, **config_overrides) -> "LongMem":
        """Load a folder written by ``save_pretrained``. ``backbone``: an HF model to use instead of the recorded one.

        ``dtype``: convert the model (backbone and SideNet) after loading; the backbone is loaded first in the type
        it was trained in (recorded in the checkpoint; fp32 for older ones), so that its fingerprint (kept by
        memories) is checked on the weights the SideNet was trained on. ``meta``: the folder's ``longmem.json`` as
        ``read_checkpoint_meta`` returned it, from a caller that has read it already (it is read once per load).
        """
        path = Path(path)
        meta = read_checkpoint_meta(path) if meta is None else meta
        if meta.get("method", "longmem") != "longmem":
            raise LongMemError(f"{path} holds a {meta['method']!r} baseline, not a LongMem model; load it with longmem.load_model")
        if backbone is None:
            ref = meta["backbone"]["path"]
            backbone = path / ref if (path / ref).is_dir() else resolve_reference(ref)
        stored = meta["backbone"].get("dtype", "float32")  # checkpoints before this field: fp32
        bb = Backbone(load_causal_lm(backbone, None if isinstance(backbone, nn.Module) else stored))
        want = meta["backbone"]["fingerprint"]
        if bb.fingerprint() != want:
            raise LongMemError(
                f"checkpoint {path} was trained on another backbone (fingerprint {want}, given {bb.name!r} has "
                f"{bb.fingerprint()}); pass the backbone it was trained on"
            )
        config = LongMemConfig.from_dict(meta["config"])
        if config_overrides:
            config = config.replace(**config_overrides)
        model = cls(bb, config)
        if stored != "float32":
            model.sidenet.float()  # as trained: float32 under autocast, over a lower-precision backbone
        if meta.get("weights_sha256") and (path / WEIGHTS_FILE).is_file() and file_sha256(path / WEIGHTS_FILE) != meta["weights_sha256"]:
            raise LongMemError(f"{path / WEIGHTS_FILE} is damaged (checksum mismatch); retrain or restore the checkpoint")
        try:
            state = load_file(str(path / WEIGHTS_FILE))
        except (SafetensorError, OSError) as e:
            raise LongMemError(f"cannot read {path / WEIGHTS_FILE}: {e}; the checkpoint is damaged or incomplete") from None
        missing, unexpected = model.sidenet.load_state_dict(state, strict=False)  # cast to the SideNet's dtype
        if (missing and not meta.get("partial")) or unexpected:
            raise LongMemError(f"{path / WEIGHTS_FILE} does not fit this backbone (missing {missing[:3]}, unexpected {unexpected[:3]})")
        return to_dtype(model, dtype) if dtype is not None else model


def resolve_config(config: LongMemConfig, L: int, context: int | None = None) -> LongMemConfig:
    """Fill in the default memory layer for an L-layer backbone and check that a SideNet layer reads it
    (and, given the backbone's ``context``, that a segment fits in it)."""
    if config.memory_layer is None:
        config = config.replace(memory_layer=default_memory_layer(L))
    if config.memory_layer >= 2 * (L // 2):
        raise LongMemError(
            f"memory_layer {config.memory_layer} has no SideNet layer to read it in a {L}-layer backbone; "
            f"choose an odd block below {2 * (L // 2)}"
        )
    if context is not None and config.segment_length is not None and config.segment_length > context:
        raise LongMemError(f"segment_length {config.segment_length} is longer than the backbone's context ({context}); "
                           f"choose at most {context}")
    return config


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, *, shifted: bool = False) -> torch.Tensor:
    """Mean next-token cross-entropy; IGNORE (-100) is skipped. The one loss of the library: LongMem, the
    baselines, training and pretraining all use it.

    Args:
        logits: (B, T, V).
        labels: (B, T). HF convention: position t predicts labels[t + 1] (the last position is unscored).
        shifted: labels[t] is already the token after position t (document streams and pretraining windows
            carry the token after the segment, so every position is scored).
    """
    if not shifted:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).to(logits.device), ignore_index=IGNORE)
