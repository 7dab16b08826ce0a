"""Memory staleness: how far the keys stored in a memory drift from what the current weights compute.

A coupled memory (the MemTRM baseline) is written by weights that keep training, so its old entries go
stale; LongMem's frozen backbone writes keys that never change (paper s1, s3). Training measures it
(``longmem train --staleness-every``) and ``longmem staleness`` plots it: it sits below both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from longmem.errors import LongMemError
from longmem.plots import pyplot, save_figure
from longmem.memory import MemoryBank


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


def plot_staleness(curves: dict[str, dict[int, float]], path) -> None:
    """One line per run: mean cosine(stored key, fresh key) by age."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, curve in curves.items():
        ax.plot(list(curve), list(curve.values()), "o-", label=name)
    ax.set_xlabel("age of the memory entry (training steps since it was written)")
    ax.set_ylabel("cosine(stored key, key from current weights)")
    ax.set_title("Memory staleness: stored vs freshly computed keys")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
