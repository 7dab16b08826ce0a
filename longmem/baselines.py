"""The paper's comparison points, trained with the same streams, optimiser and token budget as LongMem.

- ``memtrm``: a coupled memory in the style of Memorizing Transformers. The same memory bank and joint
  attention sit in the backbone's own block m, the backbone itself trains (all of it, or its upper
  half), and the memory is written by the model as it trains. Old entries were computed by older
  weights: they go *stale*, which is what LongMem's frozen backbone avoids (paper s1, s3).
- ``finetune``: the backbone fine-tuned on the same data without memory, the control for "is the gain
  just more training?".

Both implement the model protocol (``longmem.model.MemoryLM``: ``forward(ids, memory=, cache=)``, ``new_cache``,
``new_memory``, ``write_memory``, ``gate``, ...) so the training loop, the evaluations and the decoder take them
unchanged. So does ``PlainBackbone``, the frozen backbone alone. ``write_memory`` is
LongMem's (the backbone up to block m): block m's keys and values are computed before its attention
reads the memory, so they are the ones the model's own forward writes.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from longmem.attention import joint_attention
from longmem.backbone import Backbone, load_causal_lm
from longmem.cache import WindowCache
from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.io import CHECKPOINT_VERSION, atomic_write, read_checkpoint_meta, write_checkpoint_meta
from longmem.memory import MemoryBank
from longmem.model import LongMemOutput, MemoryLM, next_token_loss, resolve_config

TRAIN_LAYERS = ("all", "upper")
EXTRA_FILE = "baseline.safetensors"


class _TrainedBackbone(MemoryLM):
    """A backbone that trains (all blocks or the upper half), optionally with memory at block m."""

    uses_memory = False

    def __init__(self, hf_model: nn.Module, config: LongMemConfig, train_layers: str = "all"):
        super().__init__()
        if train_layers not in TRAIN_LAYERS:
            raise LongMemError(f"train_layers must be one of {TRAIN_LAYERS}, got {train_layers!r}")
        self.backbone = Backbone(hf_model, frozen=False)
        self.config = resolve_config(config, self.backbone.num_layers, self.backbone.max_positions)
        self.train_layers = train_layers
        self.gate = nn.Parameter(torch.zeros(self.backbone.num_heads), requires_grad=self.uses_memory)
        self.backbone.model.requires_grad_(False)
        L = self.backbone.num_layers
        first = 0 if train_layers == "all" else L // 2
        for block in self.backbone.blocks[first:]:
            block.requires_grad_(True)
        self.backbone.norm.requires_grad_(True)
        if train_layers == "all":
            self.backbone.model.get_input_embeddings().requires_grad_(True)  # tied LM heads train with it
        self._reference = Backbone(_frozen_copy(hf_model))  # the untouched backbone, for backbone_logits

    @classmethod
    def from_backbone(cls, model_or_path, config: LongMemConfig | None = None, train_layers: str = "all", dtype=None):
        return cls(load_causal_lm(model_or_path, dtype), config or LongMemConfig(), train_layers)

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]  # the reference copy is frozen

    @property
    def frozen_backbone(self) -> Backbone:
        return self._reference

    def forward(self, input_ids: torch.Tensor, memory: MemoryBank | None = None, labels: torch.Tensor | None = None,
                update_memory: bool = True, cache: WindowCache | None = None) -> LongMemOutput:
        """As ``LongMem.forward``; the memory (when the method has one) is read and written inside block m."""
        self.check_inputs(input_ids, labels, memory)
        core = None
        if self.uses_memory and memory is not None:
            gate = self.gate

            def core(q, k, v, q_raw, k_raw, **local):  # joint attention inside block m, over the model's own memory
                mem = memory.search(q_raw.detach(), topk_chunks=self.config.topk_chunks)
                return joint_attention(q, k, v, mem.keys, mem.values, gate, mem.mask, mem_q=q_raw, **local)

        out = self.backbone(input_ids, self.memory_layer, cache=None if cache is None else cache.backbone, memory_core=core)
        logits = self.backbone.logits(out.hidden_states[-1])
        if self.uses_memory and memory is not None and update_memory:
            memory.add(out.keys.detach(), out.values.detach())  # written by the weights of this step
        return LongMemOutput(logits=logits, loss=None if labels is None else next_token_loss(logits, labels))

    def memory_info(self) -> dict:
        return {"model": f"{self.method}:{self._reference.name}", "fingerprint": self._reference.fingerprint() + f"-{self.method}",
                "memory_layer": self.memory_layer}

    def save_pretrained(self, path, tokenizer=None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.backbone.model.save_pretrained(path / "backbone")
        self._reference.model.save_pretrained(path / "original")
        if tokenizer is not None:
            tokenizer.save_pretrained(path / "backbone")
        meta = {"format": "longmem-checkpoint", "version": CHECKPOINT_VERSION, "method": self.method,
                "train_layers": self.train_layers, "config": self.config.to_dict(),
                "backbone": {"path": "backbone", "model_type": self.backbone.model_type,
                             "fingerprint": self._reference.fingerprint()}}
        atomic_write(path / EXTRA_FILE, lambda tmp: save_file({"gate": self.gate.detach().cpu().contiguous()}, tmp))
        write_checkpoint_meta(path, meta)

    @classmethod
    def from_pretrained(cls, path, backbone=None, *, meta: dict | None = None):
        """Load a folder written by ``save_pretrained``; ``meta``: its ``longmem.json``, when the caller has read it."""
        path = Path(path)
        meta = read_checkpoint_meta(path) if meta is None else meta
        if meta.get("method") != cls.method:
            raise LongMemError(f"{path} holds a {meta.get('method')!r} checkpoint, not {cls.method!r}")
        model = cls(load_causal_lm(path / "backbone"), LongMemConfig.from_dict(meta["config"]), meta.get("train_layers", "all"))
        model._reference = Backbone(load_causal_lm(path / "original"))
        with torch.no_grad():
            model.gate.copy_(load_file(str(path / EXTRA_FILE))["gate"])
        return model


def _frozen_copy(hf_model: nn.Module) -> nn.Module:
    return copy.deepcopy(hf_model)


class CoupledMemoryLM(_TrainedBackbone):
    """MemTRM-style coupled memory: the trained backbone writes and reads its own memory at block m."""

    method = "memtrm"
    uses_memory = True


class FinetunedLM(_TrainedBackbone):
    """The backbone fine-tuned on the same streams, no memory."""

    method = "finetune"
    uses_memory = False


BASELINES = {cls.method: cls for cls in (CoupledMemoryLM, FinetunedLM)}


class PlainBackbone(MemoryLM):
    """The frozen backbone alone, behind the same ``forward(ids, memory=, cache=)`` as LongMem: the paper's
    baseline, decoded with a KV cache by the same ``Decoder``. It has no memory; a memory passed is ignored,
    so one evaluation loop serves every mode.

    ``PlainBackbone(model)`` shares ``model``'s backbone (no copy); its window is ``model``'s unless ``window``
    (up to the backbone's context, e.g. the whole of a prompt that fits) is given.
    """

    method = "backbone"
    gate = None  # no memory

    def __init__(self, model: MemoryLM, window: int | None = None):
        super().__init__()
        self.config = model.config if window is None else model.config.replace(segment_length=window)
        self.backbone = model.frozen_backbone

    @classmethod
    def from_causal_lm(cls, hf_model: nn.Module, segment_length: int) -> "PlainBackbone":
        """Any HF causal LM the adapter takes (e.g. ``longmem eval ppl --baseline``) read through windows of
        ``segment_length`` tokens."""
        model = cls.__new__(cls)
        MemoryLM.__init__(model)
        model.backbone = Backbone(hf_model)
        model.config = resolve_config(LongMemConfig(segment_length=segment_length), model.backbone.num_layers,
                                      model.backbone.max_positions)
        return model

    def trainable_parameters(self):
        return []  # nothing trains

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, memory: MemoryBank | None = None, labels: torch.Tensor | None = None,
                update_memory: bool = True, cache: WindowCache | None = None) -> LongMemOutput:
        self.check_inputs(input_ids, labels)
        start = len(cache) if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        bb = self.backbone(input_ids, self.memory_layer, positions, cache=None if cache is None else cache.backbone)
        logits = self.backbone.logits(bb.hidden_states[-1])
        return LongMemOutput(logits=logits, loss=None if labels is None else next_token_loss(logits, labels))
