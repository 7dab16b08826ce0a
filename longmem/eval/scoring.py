"""Scoring after a long context, shared by every evaluation: the three modes, the split of a context
into memory and local window, and the log-probabilities of continuations in one local window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from longmem.errors import LongMemError
from longmem.stream_loss import MODES  # LongMem with its memory, same weights without, the frozen backbone alone
from longmem.tokens import encode  # noqa: F401  (its name here before longmem.tokens)


# --------------------------------------------------------------------------- scoring after a long context


def split_context(ids: np.ndarray, local_len: int, chunk_size: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Cut a context into (memory part, local part): the local part is its last <= ``local_len`` tokens.

    The memory part is rounded up to whole chunks of ``chunk_size`` (so no token of it waits,
    unsearchable, for a chunk to fill) as long as that leaves at least one local token.
    """
    if local_len < 1:
        raise LongMemError(f"no room left in the local window for context (local length {local_len})")
    n_mem = max(0, len(ids) - local_len)
    rounded = -(-n_mem // chunk_size) * chunk_size
    if rounded < len(ids):
        n_mem = rounded
    return ids[:n_mem], ids[n_mem:]


@torch.no_grad()
def fill_memory(model, memory, ids: np.ndarray, entries: "WindowEntries | None" = None) -> None:
    """Write ``ids`` into every row of ``memory`` (``model.write_memory``), so B continuations can later be
    read against one past; nothing is scored. With ``entries``, windows already seen are not read again."""
    ids = torch.as_tensor(np.asarray(ids), dtype=torch.long).view(1, -1)
    if entries is None:
        model.write_memory(ids, memory)
        return
    T = model.segment_length
    for start in range(0, ids.shape[1], T):  # the windows write_memory reads, in its order
        keys, values = entries.get(ids[:, start:start + T])
        memory.add(keys.expand(memory.batch_size, -1, -1, -1), values.expand(memory.batch_size, -1, -1, -1))


class WindowEntries:
    """The memory entries of each window already read, by its token ids: what a window writes to a memory depends
    on its tokens alone (``model.memory_entries``: the frozen backbone up to block m, positions from 0), so texts
    that share windows (the pass-key test's filler, trial after trial) read each distinct window once. Holds at
    most ``limit`` windows; past that, new windows are read and not kept."""

    def __init__(self, model, limit: int = 256):
        self.model, self.limit, self.kept = model, limit, {}
        self.hits = self.misses = 0

    def get(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = window.numpy().tobytes()
        found = self.kept.get(key)
        if found is not None:
            self.hits += 1
            return found
        self.misses += 1
        found = self.model.memory_entries(window)
        if len(self.kept) < self.limit:
            self.kept[key] = found
        return found


@dataclass
class Scores:
    logprobs: list[np.ndarray]  # per continuation: log p(token | context, earlier tokens), float64
    greedy: list[np.ndarray]  # per continuation: whether each token is the argmax there (bool)


def window_logits(model, mode: str, ids: torch.Tensor, memory=None) -> torch.Tensor:
    """Logits (B, t, V) of one local window in a mode; the memory is read, never written."""
    if mode == "backbone":
        return model.backbone_logits(ids)
    if mode == "no_memory":
        return model(ids).logits
    if mode == "longmem":
        return model(ids, memory=memory, update_memory=False).logits
    raise LongMemError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")


@torch.no_grad()
def score_continuations(model, mode: str, context: np.ndarray, continuations: list[np.ndarray],
                        memory=None, pad_id: int = 0) -> Scores:
    """Log-probability of each continuation after ``context``, all in one local window.

    The window reads the context and each continuation but its last token (which is only predicted).

    Args:
        context: (n,) the local context, n >= 1.
        continuations: token arrays; n + the longest - 1 must fit the model's window.
        memory: for ``longmem`` mode, a memory whose B rows all hold the same past: the
            continuations are read B at a time (the memory is not changed).
    Returns:
        Scores: per continuation, token log-probabilities and greedy flags. A continuation is the
        greedy output iff all its flags are True (teacher forcing gives exactly the logits a greedy
        decoder would see while producing it).
    """
    n = len(context)
    longest = max(len(c) for c in continuations)
    if n < 1 or min(len(c) for c in continuations) < 1:
        raise LongMemError("a context and every continuation need at least one token")
    if n + longest - 1 > model.segment_length:
        raise LongMemError(f"context ({n}) + continuation ({longest}) tokens, less the last, exceed the local window ({model.segment_length})")
    if mode == "longmem" and memory is None:
        raise LongMemError("longmem mode reads a memory: pass one (model.new_memory) filled with fill_memory")
    rows = memory.batch_size if mode == "longmem" else len(continuations)
    logprobs, greedy = [], []
    for start in range(0, len(continuations), rows):
        group = list(continuations[start:start + rows])
        real = len(group)
        group += [group[-1]] * (rows - real)  # the memory has a fixed number of rows: pad with copies
        L = n + max(len(c) for c in group) - 1  # the last token of the longest is predicted, never read
        ids = torch.full((rows, L), pad_id, dtype=torch.long)
        ids[:, :n] = torch.as_tensor(context, dtype=torch.long)
        for r, c in enumerate(group):
            ids[r, n:n + len(c) - 1] = torch.as_tensor(c[:-1], dtype=torch.long)
        logits = window_logits(model, mode, ids.to(model.device), memory).float()  # (rows, L, V)
        logp = F.log_softmax(logits, dim=-1)
        for r, c in enumerate(group[:real]):
            pos = torch.arange(n - 1, n - 1 + len(c), device=logits.device)  # position t predicts token t + 1
            target = torch.as_tensor(c, dtype=torch.long, device=logits.device)
            logprobs.append(logp[r, pos, target].double().cpu().numpy())
            greedy.append((logits[r, pos].argmax(-1) == target).cpu().numpy())
    return Scores(logprobs, greedy)
