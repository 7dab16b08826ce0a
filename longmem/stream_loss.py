"""The streaming loss: documents read in segments of T tokens, each row's memory reset per document, the next-token
loss of every predicted token summed, overall and by position. What ``longmem train`` validates on and ``longmem
eval ppl`` (``longmem.eval.perplexity``) reports; below both.

Three modes on exactly the same predicted tokens:
    longmem     the SideNet reading the memory of the document's past segments
    no_memory   the same weights without retrieval (the SideNet alone on the local window)
    backbone    the frozen backbone alone on the local window (the paper's baseline)

Positions are counted within each document; "beyond the first window" means tokens at position
>= T, the only ones for which a memory can hold anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from longmem.data.streams import IGNORE, DocumentStreams

MODES = ("longmem", "no_memory", "backbone")  # LongMem with its memory, same weights without, the frozen backbone alone
BUCKETS = ((0, 1), (1, 4), (4, 16), (16, None))  # in local windows, as position // T


def bucket_name(lo, hi) -> str:
    return f"{lo}-{hi}" if hi is not None else f"{lo}+"


@dataclass
class NLL:
    """Summed negative log-likelihood (nats) and token counts, overall and by position."""

    segment_length: int
    total: float = 0.0
    tokens: int = 0
    beyond: float = 0.0
    beyond_tokens: int = 0
    buckets: dict = field(default_factory=lambda: {bucket_name(*b): [0.0, 0] for b in BUCKETS})
    keep: bool = False  # also keep every (document, position, nll), in streaming order
    per_token: list = field(default_factory=list)

    def add(self, nll: torch.Tensor, positions: torch.Tensor, docs: torch.Tensor | None = None) -> None:
        """nll, positions: (n,) for the predicted tokens (position = index of the token in its document)."""
        nll, positions = nll.double().cpu(), positions.cpu()
        if self.keep:
            self.per_token.append((docs.cpu() if docs is not None else torch.zeros_like(positions), positions, nll))
        self.total += float(nll.sum())
        self.tokens += nll.numel()
        far = positions >= self.segment_length
        self.beyond += float(nll[far].sum())
        self.beyond_tokens += int(far.sum())
        window = positions // self.segment_length
        for lo, hi in BUCKETS:
            sel = (window >= lo) & (window < hi if hi is not None else True)
            b = self.buckets[bucket_name(lo, hi)]
            b[0] += float(nll[sel].sum())
            b[1] += int(sel.sum())

    def token_table(self) -> dict[tuple[int, int], float]:
        """{(document, position): nll} for every predicted token (needs keep=True)."""
        table = {}
        for docs, pos, nll in self.per_token:
            table.update(zip(zip(docs.tolist(), pos.tolist()), nll.tolist()))
        return table

    def summary(self) -> dict:
        ppl = lambda s, n: math.exp(s / n) if n else None  # noqa: E731
        return {
            "ppl": ppl(self.total, self.tokens),
            "ppl_beyond_window": ppl(self.beyond, self.beyond_tokens),
            "loss": self.total / self.tokens if self.tokens else None,
            "tokens": self.tokens,
            "tokens_beyond_window": self.beyond_tokens,
            "ppl_by_position": {name: ppl(s, n) for name, (s, n) in self.buckets.items()},
            "tokens_by_position": {name: n for name, (s, n) in self.buckets.items()},
        }


@torch.no_grad()
def stream_nll(model, docs: list[np.ndarray], mode: str, segment_length: int | None = None, batch_size: int = 1,
               memory_kwargs: dict | None = None, autocast: torch.dtype | None = None, progress: bool = False,
               desc: str | None = None, keep_tokens: bool = False) -> NLL:
    """Stream every document once in the given mode and sum the next-token NLL."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    T = segment_length or model.segment_length
    batch_size = max(1, min(batch_size, len(docs)))  # rows beyond the documents would only sit idle (and an enormous count hang)
    was_training = model.training
    model.eval()
    streams = DocumentStreams(docs, batch_size=batch_size, segment_length=T, loop=False)
    kw = {"dtype": autocast, **(memory_kwargs or {})} if autocast is not None else (memory_kwargs or {})
    memory = model.new_memory(batch_size, **kw) if mode == "longmem" else None
    stats = NLL(T, keep=keep_tokens)
    total = sum(max(0, -(-(len(d) - 1) // T)) for d in streams.docs)
    device = model.device
    bar = tqdm(total=total, desc=desc or mode, unit="seg", disable=not progress, leave=False)
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        for batch in streams:
            ids, targets = batch.input_ids.to(device), batch.targets.to(device)
            if memory is not None and batch.reset:
                memory.reset(batch.reset)
            if mode == "backbone":
                logits = model.backbone_logits(ids)
            else:
                logits = model(ids, memory=memory).logits
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
            positions = batch.segment_index.view(-1, 1).to(device) * T + torch.arange(1, T + 1, device=device)
            valid = targets.flatten() != IGNORE
            doc_ids = batch.doc_index.view(-1, 1).expand(-1, T).to(device).flatten()
            stats.add(nll[valid], positions.flatten()[valid], doc_ids[valid])
            bar.update(int((batch.doc_index >= 0).sum()))
    bar.close()
    model.train(was_training)
    return stats
