"""The paper's comparison points, trained with the same streams, optimiser and token budget as LongMem.

- ``memtrm``: a coupled memory in the style of Memorizing Transformers. The same memory bank and joint
  attention sit in the backbone's own block m, the backbone itself trains (all of it, or its upper
  half), and the memory is written by the model as it trains. Old entries were computed by older
  weights: they go *stale*, which is what LongMem's frozen backbone avoids (paper s1, s3).
- ``finetune``: the backbone fine-tuned on the same data without memory, the control for "is the gain
  just more training?".

Both keep LongMem's streaming interface (``forward(ids, memory=...)``, ``new_memory``, ``backbone_logits``)
so the training loop and the evaluations take them unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from longmem.attention import joint_attention
from longmem.backbone import Backbone, load_causal_lm
from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.memory import MemoryBank
from longmem.model import (CHECKPOINT_VERSION, CONFIG_FILE, LongMemOutput, MemoryLM, _atomic, causal_lm_loss,
                           read_checkpoint_meta, resolve_config, write_checkpoint_meta)

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

    def forward(self, input_ids: torch.Tensor, memory: MemoryBank | None = None, labels: torch.Tensor | None = None,
                update_memory: bool = True) -> LongMemOutput:
        self._check_inputs(input_ids, labels, memory)
        core = None
        if self.uses_memory and memory is not None:
            gate = self.gate

            def core(q, k, v, q_raw, k_raw, **local):  # joint attention inside block m, over the model's own memory
                mem = memory.search(q_raw.detach())
                return joint_attention(q, k, v, mem.keys, mem.values, gate, mem.mask, mem_q=q_raw, **local)

        out = self.backbone(input_ids, self.memory_layer, memory_core=core)
        logits = self.backbone.logits(out.hidden_states[-1])
        if self.uses_memory and memory is not None and update_memory:
            memory.add(out.keys.detach(), out.values.detach())  # written by the weights of this step
        return LongMemOutput(logits=logits, loss=None if labels is None else causal_lm_loss(logits, labels))

    @torch.no_grad()
    def backbone_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The original (untrained) backbone, for the same three-mode tables as LongMem."""
        bb = self._reference(input_ids, self.memory_layer)
        return self._reference.logits(bb.hidden_states[-1])

    def memory_info(self) -> dict:
        return {"model": f"{self.method}:{self._reference.name}", "fingerprint": self._reference.fingerprint() + f"-{self.method}",
                "memory_layer": self.memory_layer}

    def save_pretrained(self, path, tokenizer=None) -> None:
        from safetensors.torch import save_file

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
        _atomic(path / EXTRA_FILE, lambda tmp: save_file({"gate": self.gate.detach().cpu().contiguous()}, tmp))
        write_checkpoint_meta(path, meta)

    @classmethod
    def from_pretrained(cls, path, backbone=None):
        from safetensors.torch import load_file

        path = Path(path)
        meta = read_checkpoint_meta(path)
        if meta.get("method") != cls.method:
            raise LongMemError(f"{path} holds a {meta.get('method')!r} checkpoint, not {cls.method!r}")
        model = cls(load_causal_lm(path / "backbone"), LongMemConfig.from_dict(meta["config"]), meta.get("train_layers", "all"))
        model._reference = Backbone(load_causal_lm(path / "original"))
        with torch.no_grad():
            model.gate.copy_(load_file(str(path / EXTRA_FILE))["gate"])
        return model


def _frozen_copy(hf_model: nn.Module) -> nn.Module:
    import copy

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


@torch.no_grad()
def staleness(model, memory: MemoryBank, segments: list[torch.Tensor], row: int = 0) -> list[dict]:
    """Cosine similarity between the stored block-m keys of a row and the keys the *current* weights give
    for the same segments, by age (segments back; the newest is age 1).

    Args:
        segments: the row's segments already written to memory, oldest first, each (1, T).
    """
    if not segments:
        return []
    T = segments[0].shape[1]
    stored, _ = memory.chronological(row)  # (Hkv, N, csz, Dh)
    stored = stored.reshape(stored.shape[0], -1, stored.shape[-1])  # (Hkv, N*csz, Dh)
    n = stored.shape[1] // T  # whole segments still in memory (FIFO may have dropped older ones)
    out = []
    for age in range(1, min(n, len(segments)) + 1):
        seg = segments[-age].to(model.device)
        fresh = model.backbone(seg, model.memory_layer, upto=model.memory_layer).keys[0]  # (Hkv, T, Dh)
        old = stored[:, stored.shape[1] - age * T: stored.shape[1] - (age - 1) * T]
        cos = torch.nn.functional.cosine_similarity(fresh.float(), old.float().to(fresh.device), dim=-1).mean()
        out.append({"age": age, "cos": float(cos)})
    return out


# -- the staleness report --------------------------------------------------------------------------


def staleness_curve(metrics_path: Path) -> dict[int, float]:
    """Mean cosine similarity by age (steps since written) over all staleness records of a run."""
    sums: dict[int, list[float]] = {}
    with open(metrics_path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                points = [(int(p["age"]), float(p["cos"])) for p in record.get("staleness", [])]
            except (ValueError, TypeError, KeyError, AttributeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise LongMemError(f"{metrics_path}:{lineno} is not valid JSON of a `longmem train` record ({type(e).__name__}); "
                                   "the file is damaged: train again, or drop the broken line") from None
            for age, cos in points:
                sums.setdefault(age, []).append(cos)
    return {age: sum(v) / len(v) for age, v in sorted(sums.items())}


def _run_staleness(args) -> int:
    from longmem.eval_cli import check_output

    check_output(args.json)
    check_output(args.plot, "--plot")
    curves = {}
    for run in args.run:
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise LongMemError(f"{run} has no metrics.jsonl; give the --out folder of a `longmem train` run")
        meta = read_checkpoint_meta(Path(run)) if (Path(run) / CONFIG_FILE).is_file() else {}
        curve = staleness_curve(path)
        if not curve:
            raise LongMemError(f"{run} recorded no staleness; train it with --staleness-every N")
        curves[f"{meta.get('method', 'run')}:{Path(run).name}"] = curve
    for name, curve in curves.items():
        print(f"{name}: " + ", ".join(f"age {a}: {c:.4f}" for a, c in list(curve.items())[:12]))
    if args.json:
        from longmem.eval_cli import write_result

        write_result(args.json, {k: {str(a): c for a, c in v.items()} for k, v in curves.items()})
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, curve in curves.items():
            ax.plot(list(curve), list(curve.values()), "o-", label=name)
        ax.set_xlabel("age of the memory entry (training steps since it was written)")
        ax.set_ylabel("cosine(stored key, key from current weights)")
        ax.set_title("Memory staleness: stored vs freshly computed keys")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        plt.close(fig)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("staleness", help="plot stored-vs-fresh key similarity by age for training runs",
                       description="Read the staleness records of `longmem train --staleness-every N` runs (e.g. one "
                                   "--method memtrm and one --method longmem) and report similarity by memory age.")
    p.add_argument("--run", nargs="+", required=True, help="training output folders")
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--json", help="write the curves here")
    p.set_defaults(func=_run_staleness)
