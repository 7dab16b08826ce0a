"""Document streams: each batch row reads one document at a time, segment by segment (paper s3.4).

A row's memory must hold *its* document's past, so the loader never mixes documents inside a row:
row b serves segment s of its current document at step s, then moves to its next document, and
reports that move so the caller resets that row's memory. Under ``torch.distributed`` each rank owns
``batch_size`` of the ``world_size * batch_size`` global rows, and so its own memories.

A document of n tokens gives ceil((n - 1) / T) segments: inputs tokens[sT : sT + T], targets
tokens[sT + 1 : sT + T + 1]; the last segment is padded (targets -100), so every token but the
first of a document is predicted exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from longmem.data.corpora import iter_documents, text_pieces
from longmem.errors import LongMemError
from longmem.model import IGNORE  # the label the loss skips
from longmem.tokens import token_ids_batch


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) next token of each input, IGNORE on padding
    reset: list[int]  # rows that start a new document at this batch: reset their memory first
    segment_index: torch.Tensor  # (B,) index s of the segment within its document (-1: idle row)
    doc_index: torch.Tensor  # (B,) which document each row reads (-1: idle row)


def encode_documents(paths, tokenizer, min_tokens: int = 2, progress: bool = False, batch: int = 256,
                     allow_empty: bool = False) -> list[np.ndarray]:
    """Token ids (int32) of every document under ``paths`` (files, folders, .jsonl, hf:NAME).

    Up to ``batch`` pieces, from as many documents as it takes, are encoded in one ``encode_batch`` call so the
    tokenizer's threads are busy even when every document is one piece; the ids are those of encoding each piece
    alone."""
    docs: list[np.ndarray] = []
    pending: list[tuple[int, str]] = []  # (document number, piece)
    parts: dict[int, list[np.ndarray]] = {}
    n_docs = 0

    def flush() -> None:
        for (d, _), ids in zip(pending, token_ids_batch(tokenizer, [piece for _, piece in pending])):
            parts[d].append(np.asarray(ids, dtype=np.int32))
        pending.clear()

    def finish(upto: int) -> None:  # documents below `upto` are complete
        for d in sorted(k for k in parts if k < upto):
            ids = parts.pop(d)
            ids = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)
            if len(ids) >= min_tokens:
                docs.append(ids)

    for path in [paths] if isinstance(paths, (str, bytes)) or not hasattr(paths, "__iter__") else paths:
        for doc in tqdm(iter_documents(path), desc=f"tokenizing {path}", unit="doc", disable=not progress, leave=False):
            parts[n_docs] = []
            for piece in text_pieces(doc.text):
                pending.append((n_docs, piece))
                if len(pending) >= batch:
                    flush()
                    finish(n_docs)
            n_docs += 1
    if pending:
        flush()
    finish(n_docs)
    if not docs and not allow_empty:
        raise LongMemError(f"no document with at least {min_tokens} tokens in {paths}; give longer text")
    return docs


def num_segments(n_tokens: int, segment_length: int) -> int:
    return max(0, -(-(n_tokens - 1) // segment_length))


class DocumentStreams:
    """Batches of B rows, each row streaming its own documents in order.

    Args:
        docs: token arrays, one per document.
        batch_size: B rows on this rank.
        segment_length: T tokens per segment.
        loop: cycle through the documents forever (training) or stop when all are read once (evaluation).
        seed: order of documents per row (a fresh order each pass when looping).
        rank, world_size: this process's share of the global rows.
        pad_id: token used to pad the last segment of a document and idle rows.
    """

    def __init__(self, docs, batch_size: int, segment_length: int, loop: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pad_id: int = 0):
        if batch_size < 1 or segment_length < 1:
            raise LongMemError(f"batch_size and segment_length must be positive, got {batch_size}, {segment_length}")
        self.docs = [d for d in docs if len(d) >= 2]
        if not self.docs:
            raise LongMemError("no document has two tokens or more; nothing to predict")
        self.B, self.T, self.loop, self.seed, self.pad_id = batch_size, segment_length, loop, seed, pad_id
        G = batch_size * world_size
        rows = [rank * batch_size + b for b in range(batch_size)]
        order = np.random.default_rng(seed).permutation(len(self.docs)) if loop else np.arange(len(self.docs))
        if loop and len(self.docs) < G:  # fewer documents than rows: rows share documents, offset
            self.assigned = [[int(order[(g) % len(order)])] for g in rows]
        else:
            self.assigned = [[int(i) for i in order[g::G]] for g in rows]
        # per row: pass number, position in its (shuffled) list, segment within the document
        self.state = {"pass": [0] * batch_size, "pos": [0] * batch_size, "seg": [0] * batch_size}

    def _row_order(self, b: int, pass_no: int) -> list[int]:
        docs = self.assigned[b]
        if not self.loop or pass_no == 0:
            return docs
        rng = np.random.default_rng((self.seed, b, pass_no))
        return [docs[i] for i in rng.permutation(len(docs))]

    def current_doc(self, b: int) -> int:
        """Document index row b reads next, or -1 when it has finished (evaluation)."""
        order = self._row_order(b, self.state["pass"][b])
        pos = self.state["pos"][b]
        return order[pos] if pos < len(order) else -1

    def done(self) -> bool:
        return all(self.current_doc(b) < 0 for b in range(self.B))

    def __iter__(self):
        while not self.done():
            yield self.next_batch()

    def next_batch(self) -> Batch:
        B, T = self.B, self.T
        ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        targets = torch.full((B, T), IGNORE, dtype=torch.long)
        seg_index = torch.full((B,), -1, dtype=torch.long)
        doc_index = torch.full((B,), -1, dtype=torch.long)
        reset = []
        st = self.state
        for b in range(B):
            d = self.current_doc(b)
            if d < 0:
                continue
            if st["seg"][b] == 0:
                reset.append(b)  # a new document starts in this row
            tokens = self.docs[d]
            s = st["seg"][b]
            x = tokens[s * T : s * T + T]
            y = tokens[s * T + 1 : s * T + T + 1]
            ids[b, : len(x)] = torch.from_numpy(x.astype(np.int64))
            targets[b, : len(y)] = torch.from_numpy(y.astype(np.int64))
            seg_index[b], doc_index[b] = s, d
            st["seg"][b] += 1
            if st["seg"][b] >= num_segments(len(tokens), T):  # document finished: next one
                st["seg"][b] = 0
                st["pos"][b] += 1
                if self.loop and st["pos"][b] >= len(self.assigned[b]):
                    st["pos"][b], st["pass"][b] = 0, st["pass"][b] + 1
        return Batch(ids, targets, reset, seg_index, doc_index)

    def state_dict(self) -> dict:
        return {k: list(v) for k, v in self.state.items()}

    def load_state_dict(self, state: dict) -> None:
        for k in self.state:
            if len(state[k]) != self.B:
                raise LongMemError(f"stream state is for {len(state[k])} rows, this run has {self.B}; resume with the same --batch-size")
            self.state[k] = list(state[k])

    def replay_segments(self, b: int) -> list[torch.Tensor]:
        """The segments row b has already read of its current document (to rebuild its memory)."""
        d, s = self.current_doc(b), self.state["seg"][b]
        if d < 0 or s == 0:
            return []
        tokens = self.docs[d]
        out = []
        for i in range(s):
            x = torch.full((1, self.T), self.pad_id, dtype=torch.long)
            chunk = tokens[i * self.T : i * self.T + self.T]
            x[0, : len(chunk)] = torch.from_numpy(chunk.astype(np.int64))
            out.append(x)
        return out
