"""The memory bank: per-row, FIFO, chunked cache of block-m keys and values (paper, "Memory Retrieval and Fusion").

Glossary:
    B    rows: each row is one document stream / user / conversation, with a memory of its own
    Hkv  key/value heads of block m (one memory per row and head)
    H    query heads (a multiple of Hkv; query head h searches key/value head h // (H / Hkv))
    csz  chunk_size: tokens per chunk; a chunk is represented by the mean of its token keys
    C    chunks per row at most (memory_size / csz); N the chunks currently stored
    k_c  chunks retrieved per query; K = k_c * csz tokens. The reader's setting: a model asks for its config's
         ``topk_chunks`` at every search; a memory holds its own k_c only when built with one (an override)

Storage is a ring buffer per row, allocated lazily and grown by doubling up to C, so a small memory
costs little and a full one is never copied on eviction: the oldest chunk is overwritten in place.
Tokens that do not fill a whole chunk wait in a per-row pending buffer for the next write.

Search is exact by default (``index="flat"``). ``index="ivf"`` adds, per row and head, a faiss inverted-file
index over the chunk keys (approximate: only ``nprobe`` of ``nlist`` clusters are scanned), built once the
row holds enough chunks to train it and then kept in step with every write and eviction; below that size
the exact search is used. Its centroids are saved with the memory, so a reloaded memory retrieves the same.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from longmem.config import BACKENDS, METRICS
from longmem.dtypes import DTYPES
from longmem.errors import LongMemError
from longmem.io import atomic_write, sha256_bytes

FORMAT_VERSION = 1
INDEXES = ("flat", "ivf")


@dataclass
class Retrieved:
    keys: torch.Tensor  # (B, H, T, K, Dh)
    values: torch.Tensor  # (B, H, T, K, Dh)
    mask: torch.Tensor  # (B, H, T, K) bool, True = a real memory token
    chunks: torch.Tensor  # (B, H, T, k_c) slot index of each retrieved chunk, -1 where missing

    def repeat_heads(self, groups: int) -> "Retrieved":
        """Each head's retrieval shared by ``groups`` consecutive query heads (GQA: head h -> h // groups)."""
        if groups == 1:
            return self
        rep = lambda t: t.repeat_interleave(groups, dim=1)  # noqa: E731
        return Retrieved(rep(self.keys), rep(self.values), rep(self.mask), rep(self.chunks))


@dataclass
class _Row:
    count: int = 0  # valid chunks, always slots [0, count)
    head: int = 0  # next slot to write (the oldest chunk once the ring is full)
    pending_k: torch.Tensor | None = None  # (Hkv, p, Dh), p < csz
    pending_v: torch.Tensor | None = None
    sources: list = field(default_factory=list)  # free-form provenance (file names), saved with the memory


class MemoryBank:
    """Isolated long-term memories for B rows. ``add`` writes, ``search`` reads, ``reset`` forgets.

    Args:
        batch_size: B, the number of independent memories.
        num_heads: Hkv, key/value heads of the cached layer.
        head_dim: Dh.
        chunk_size: csz tokens per chunk.
        memory_size: tokens kept per row (FIFO beyond that); a multiple of chunk_size.
        topk_chunks: k_c chunks returned per query by ``search``, overriding what the caller asks for (an
            evaluation's ``--topk-chunks``); None (a model's memory, ``new_memory``): as many as the caller asks,
            a model asking for its config's ``topk_chunks``, so that the config is the one owner of k_c.
        dtype, device: storage dtype and device (the model's).
        backend: "faiss" (exact inner product, CPU), "torch" (matmul + top-k, any device) or "auto".
        info: what this memory belongs to (model name, fingerprint, layer); saved with it.
        index: "flat" (exact search) or "ivf" (approximate, faiss; for memories of hundreds of thousands of tokens).
        nlist, nprobe: ivf clusters per row and head (default sqrt of the chunk capacity) and clusters scanned per query.
        metric: chunk score, "ip" (inner product with the chunk-mean key, the paper) or "cosine" (with the unit-length
            chunk-mean key; the query's norm does not change its ranking). Retrieved tokens keep their raw keys.
    """

    def __init__(
        self,
        batch_size: int,
        num_heads: int,
        head_dim: int,
        chunk_size: int = 4,
        memory_size: int = 65536,
        topk_chunks: int | None = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        backend: str = "auto",
        info: dict | None = None,
        index: str = "flat",
        nlist: int | None = None,
        nprobe: int = 64,
        metric: str = "ip",
    ):
        for name, value in (("batch_size", batch_size), ("num_heads", num_heads), ("head_dim", head_dim),
                            ("chunk_size", chunk_size), ("memory_size", memory_size), ("topk_chunks", topk_chunks)):
            if (value is not None or name != "topk_chunks") and (not isinstance(value, int) or value < 1):
                raise LongMemError(f"MemoryBank {name} must be a positive integer, got {value!r}")
        if memory_size % chunk_size:
            raise LongMemError(f"memory_size ({memory_size}) must be a multiple of chunk_size ({chunk_size})")
        if backend not in BACKENDS:
            raise LongMemError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if metric not in METRICS:
            raise LongMemError(f"metric must be one of {METRICS}, got {metric!r}")
        if index not in INDEXES:
            raise LongMemError(f"index must be one of {INDEXES}, got {index!r}")
        for name, value in (("nlist", nlist), ("nprobe", nprobe)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LongMemError(f"MemoryBank {name} must be a positive integer, got {value!r}")
        self.batch_size, self.num_heads, self.head_dim = batch_size, num_heads, head_dim
        self.chunk_size, self.memory_size, self.topk_chunks = chunk_size, memory_size, topk_chunks
        self.max_chunks = memory_size // chunk_size
        self.dtype, self.device = dtype, torch.device(device)
        self.backend = backend
        self.info = dict(info or {})
        self.rows = [_Row() for _ in range(batch_size)]
        self.keys = self.values = None  # (B, Hkv, cap, csz, Dh)
        self.chunk_keys = None  # (B, Hkv, cap, Dh) fp32: mean key of each chunk (the search index)
        self.index, self.nprobe, self.metric = index, nprobe, metric
        self.nlist = nlist or max(1, round(math.sqrt(self.max_chunks)))
        self.ivf_min_chunks = 39 * self.nlist  # faiss's minimum training set for k-means with nlist centroids
        self.centroids: dict[int, torch.Tensor] = {}  # row -> (Hkv, nlist, Dh) fp32, once trained
        self._ivf: dict[int, list] = {}  # row -> one faiss IndexIVFFlat per head (ids = slots)
        if index == "ivf" and self._backend() != "faiss":
            raise LongMemError("the ivf index runs on faiss: keep the memory on the CPU or use backend='faiss'")

    # -- bookkeeping -------------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def num_tokens(self, row: int) -> int:
        """Tokens stored in whole chunks (searchable) for one row; at most memory_size."""
        return self.rows[self._row(row)].count * self.chunk_size

    def num_pending(self, row: int) -> int:
        """Tokens waiting for their chunk to fill (not yet searchable)."""
        p = self.rows[self._row(row)].pending_k
        return 0 if p is None else p.shape[1]

    def reset(self, rows=None) -> None:
        """Forget the given rows (all rows when None), e.g. at a document boundary."""
        for b in range(self.batch_size) if rows is None else rows:
            self.rows[self._row(b)] = _Row()
            self._ivf.pop(b, None)
            self.centroids.pop(b, None)
        if all(r.count == 0 for r in self.rows):
            self.keys = self.values = self.chunk_keys = None

    def _row(self, row: int) -> int:
        if not isinstance(row, int) or not 0 <= row < self.batch_size:
            raise LongMemError(f"memory row must be an integer in [0, {self.batch_size}), got {row!r}")
        return row

    def _backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        return "faiss" if self.device.type == "cpu" else "torch"

    def _grow(self, needed: int) -> None:
        """Make room for ``needed`` chunks per row (before the ring wraps, slots [0, count) are used)."""
        cap = self.capacity
        if needed <= cap:
            return
        new_cap = min(self.max_chunks, max(needed, 2 * cap, 16))
        B, Hkv, csz, Dh = self.batch_size, self.num_heads, self.chunk_size, self.head_dim
        keys = torch.zeros(B, Hkv, new_cap, csz, Dh, dtype=self.dtype, device=self.device)
        values = torch.zeros_like(keys)
        chunk_keys = torch.zeros(B, Hkv, new_cap, Dh, dtype=torch.float32, device=self.device)  # search index
        if cap:
            keys[:, :, :cap] = self.keys
            values[:, :, :cap] = self.values
            chunk_keys[:, :, :cap] = self.chunk_keys
        self.keys, self.values, self.chunk_keys = keys, values, chunk_keys

    # -- write -------------------------------------------------------------------------------------

    @torch.no_grad()
    def add(self, keys: torch.Tensor, values: torch.Tensor, rows=None) -> None:
        """Append tokens (oldest first) to the rows' memories; evict the oldest chunks beyond memory_size.

        Args:
            keys, values: (B, Hkv, T, Dh) for all B rows, or (len(rows), Hkv, T, Dh) for the given rows.
            rows: which rows the first dimension refers to (default: all rows in order).
        """
        rows = list(range(self.batch_size)) if rows is None else [self._row(r) for r in rows]
        expected = (len(rows), self.num_heads, keys.shape[2] if keys.dim() == 4 else -1, self.head_dim)
        if keys.dim() != 4 or tuple(keys.shape) != expected or values.shape != keys.shape:
            raise LongMemError(
                f"memory add expects keys and values of shape (rows={len(rows)}, heads={self.num_heads}, T, "
                f"head_dim={self.head_dim}), got {tuple(keys.shape)} and {tuple(values.shape)}"
            )
        keys = keys.detach().to(self.device, self.dtype)
        values = values.detach().to(self.device, self.dtype)
        csz, C = self.chunk_size, self.max_chunks
        for i, b in enumerate(rows):
            row = self.rows[b]
            k, v = keys[i], values[i]  # (Hkv, T, Dh)
            if row.pending_k is not None:
                k, v = torch.cat([row.pending_k, k], dim=1), torch.cat([row.pending_v, v], dim=1)
            n = k.shape[1] // csz  # whole chunks
            row.pending_k = k[:, n * csz:].clone() if k.shape[1] % csz else None
            row.pending_v = v[:, n * csz:].clone() if k.shape[1] % csz else None
            if n == 0:
                continue
            k = k[:, : n * csz].reshape(self.num_heads, n, csz, self.head_dim)  # (Hkv, n, csz, Dh)
            v = v[:, : n * csz].reshape(self.num_heads, n, csz, self.head_dim)
            if n > C:  # more than fits: only the newest C chunks survive
                k, v, n = k[:, -C:], v[:, -C:], C
            self._grow(min(C, row.count + n))
            slots = (row.head + torch.arange(n, device=self.device)) % C
            self.keys[b, :, slots] = k
            self.values[b, :, slots] = v
            mean = k.float().mean(dim=2)  # chunk representative, kept in fp32 for search
            self.chunk_keys[b, :, slots] = torch.nn.functional.normalize(mean, dim=-1) if self.metric == "cosine" else mean
            if b in self._ivf:
                self._ivf_update(b, slots, overwritten=slots[slots < row.count])
            row.head = (row.head + n) % C
            row.count = min(C, row.count + n)

    # -- read --------------------------------------------------------------------------------------

    @torch.no_grad()
    def search_chunks(self, queries: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact maximum-inner-product search over chunk-mean keys, per row and key/value head.

        Args:
            queries: (B, Hkv, Q, Dh).
        Returns:
            slots (B, Hkv, Q, k) long, scores (B, Hkv, Q, k) float32, best first; slot -1 and
            score -inf where fewer than k chunks are stored.
        """
        k = k or self.topk_chunks
        if k is None:
            raise LongMemError("memory search needs k_c: pass topk_chunks (a model passes its config's), or build the "
                               "MemoryBank with one")
        B, Hkv, Q, _ = queries.shape
        slots = torch.full((B, Hkv, Q, k), -1, dtype=torch.long, device=queries.device)
        scores = torch.full((B, Hkv, Q, k), float("-inf"), dtype=torch.float32, device=queries.device)
        counts = [r.count for r in self.rows]
        if max(counts) == 0:
            return slots, scores
        if self._backend() == "faiss":
            import faiss

            q_np = queries.detach().float().cpu().numpy()
            ck = self.chunk_keys.cpu().numpy()  # fp32 already: no copy on CPU
            for b in range(B):
                if counts[b] == 0:
                    continue
                kk = min(k, counts[b])
                ivf = self._ivf_for(b)
                for h in range(Hkv):
                    if ivf is None:
                        D, I = faiss.knn(q_np[b, h], ck[b, h, : counts[b]], kk, metric=faiss.METRIC_INNER_PRODUCT)
                    else:
                        ivf[h].nprobe = self.nprobe
                        D, I = ivf[h].search(q_np[b, h], kk)
                        D[I < 0] = -np.inf  # fewer than kk chunks in the scanned clusters
                    slots[b, h, :, :kk] = torch.from_numpy(I).to(slots.device)
                    scores[b, h, :, :kk] = torch.from_numpy(D).to(scores.device)
        else:
            n = max(counts)  # slots beyond the fullest row hold nothing yet (capacity grows by doubling)
            s = torch.matmul(queries.float(), self.chunk_keys[:, :, :n].transpose(-1, -2))  # (B, Hkv, Q, n)
            if min(counts) < n:  # some rows hold fewer chunks: mask their empty slots in place
                valid = torch.arange(n, device=s.device) < torch.tensor(counts, device=s.device).view(B, 1)
                s.masked_fill_(~valid.view(B, 1, 1, -1), float("-inf"))
            kk = min(k, n)
            top, idx = s.topk(kk, dim=-1)
            found = torch.isfinite(top)
            slots[..., :kk] = torch.where(found, idx, -1)
            scores[..., :kk] = top
        return slots, scores

    def _ivf_for(self, b: int) -> list | None:
        """Row b's per-head ivf indexes, trained and filled on first need; None while search is exact."""
        if self.index != "ivf" or (b not in self.centroids and self.rows[b].count < self.ivf_min_chunks):
            return None
        if b not in self._ivf:
            import faiss

            n, Dh = self.rows[b].count, self.head_dim
            ck = self.chunk_keys[b, :, :n].cpu().numpy()
            indexes, cents = [], []
            for h in range(self.num_heads):
                quantizer = faiss.IndexFlatIP(Dh)
                ivf = faiss.IndexIVFFlat(quantizer, Dh, self.nlist, faiss.METRIC_INNER_PRODUCT)
                if b in self.centroids:  # a loaded memory: the centroids it was saved with
                    quantizer.add(self.centroids[b][h].numpy())
                    ivf.is_trained = True
                else:
                    ivf.train(ck[h])
                    cents.append(torch.from_numpy(quantizer.reconstruct_n(0, self.nlist)))
                ivf.set_direct_map_type(faiss.DirectMap.Hashtable)  # O(1) removal on eviction
                ivf.add_with_ids(np.ascontiguousarray(ck[h]), np.arange(n, dtype=np.int64))
                indexes.append(ivf)
            if cents:
                self.centroids[b] = torch.stack(cents)
            self._ivf[b] = indexes
        return self._ivf[b]

    def _ivf_update(self, b: int, slots: torch.Tensor, overwritten: torch.Tensor) -> None:
        """Keep row b's ivf indexes equal to its stored chunks after a write to ``slots``."""
        ids = slots.cpu().numpy().astype(np.int64)
        ck = self.chunk_keys[b][:, slots].cpu().numpy()  # (Hkv, n, Dh)
        gone = overwritten.cpu().numpy().astype(np.int64)
        for h, ivf in enumerate(self._ivf[b]):
            if len(gone):
                ivf.remove_ids(gone)
            ivf.add_with_ids(np.ascontiguousarray(ck[h]), ids)

    def next_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """The slot of the chunk written right after each of ``slots`` (B, Hkv, Q, k), -1 where there is none
        (the newest chunk, or a missing one). The ring holds chunks oldest-first from ``head`` once full, in
        [0, count) before, so the successor of slot s is s + 1 (mod the ring size) unless that is ``head``."""
        heads = torch.tensor([r.head for r in self.rows], device=slots.device).view(-1, 1, 1, 1)
        nxt = (slots + 1) % self.max_chunks
        return torch.where((slots >= 0) & (nxt != heads), nxt, -1)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, next_chunks: bool = False, *, topk_chunks: int | None = None) -> Retrieved:
        """Retrieve the top-k_c chunks per query token and head, expanded to their tokens.

        Args:
            queries: (B, H, T, Dh) retrieval queries (H a multiple of the memory's Hkv).
            next_chunks: also return the chunk stored right after each retrieved one (not in the paper; a token
                that matches the query may end its chunk, and what follows it is then in the next one).
            topk_chunks: k_c, what the caller reads (a model: its config's); a memory built with its own
                ``topk_chunks`` uses that instead.
        Returns:
            Retrieved keys/values (B, H, T, K, Dh) with K = k_c * csz (2 k_c * csz with ``next_chunks``; each
            retrieved chunk's successor after the k_c retrieved ones, masked out where it is one of them or
            does not exist), and a validity mask.
        """
        B, H, T, Dh = queries.shape
        if B != self.batch_size or H % self.num_heads or Dh != self.head_dim:
            raise LongMemError(
                f"memory search expects queries (B={self.batch_size}, H=multiple of {self.num_heads}, T, "
                f"Dh={self.head_dim}), got {tuple(queries.shape)}"
            )
        G, kc, csz = H // self.num_heads, self.topk_chunks or topk_chunks, self.chunk_size
        q = queries.reshape(B, self.num_heads, G * T, Dh)  # query head h -> kv head h // G
        slots, _ = self.search_chunks(q, kc)  # (B, Hkv, G*T, kc)
        if next_chunks:
            succ = self.next_slots(slots)
            # a successor that is itself retrieved is not taken twice (it would get double softmax weight)
            succ = succ.masked_fill((succ.unsqueeze(-1) == slots.unsqueeze(-2)).any(-1), -1)
            slots, kc = torch.cat([slots, succ], dim=-1), 2 * kc
        found = slots >= 0
        if self.keys is None:
            shape = (B, H, T, kc * csz, Dh)
            empty = torch.zeros(shape, dtype=self.dtype, device=queries.device)
            return Retrieved(empty, empty, torch.zeros(shape[:-1], dtype=torch.bool, device=queries.device),
                             slots.view(B, H, T, kc))
        # one flat index_select per tensor: (b, h, slot) -> row of a (B*Hkv*cap, csz*Dh) view
        cap = self.capacity
        base = (torch.arange(B, device=self.device).view(B, 1, 1, 1) * self.num_heads
                + torch.arange(self.num_heads, device=self.device).view(1, -1, 1, 1)) * cap
        flat = (base + slots.clamp_min(0).to(self.device)).reshape(-1)  # (B*Hkv*G*T*kc,)
        mem_k = self.keys.view(-1, csz * Dh).index_select(0, flat)
        mem_v = self.values.view(-1, csz * Dh).index_select(0, flat)
        mask = found.repeat_interleave(csz, dim=-1)  # (B, Hkv, G*T, kc*csz)
        return Retrieved(
            keys=mem_k.view(B, H, T, kc * csz, Dh).to(queries.device),  # (B, H, T, K, Dh)
            values=mem_v.view(B, H, T, kc * csz, Dh).to(queries.device),
            mask=mask.view(B, H, T, kc * csz).to(queries.device),
            chunks=slots.view(B, H, T, kc),
        )

    # -- views -------------------------------------------------------------------------------------

    def chronological(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One row's stored chunks, oldest first: keys and values (Hkv, N, csz, Dh)."""
        r = self.rows[self._row(row)]
        if r.count == 0:
            shape = (self.num_heads, 0, self.chunk_size, self.head_dim)
            return torch.zeros(shape, dtype=self.dtype), torch.zeros(shape, dtype=self.dtype)
        start = r.head if r.count == self.max_chunks else 0
        order = (start + torch.arange(r.count, device=self.device)) % self.max_chunks
        return self.keys[row, :, order], self.values[row, :, order]

    def nbytes(self) -> int:
        """Bytes held by the stored tensors (allocated capacity, all rows)."""
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.chunk_keys) if t is not None)

    # -- persistence -------------------------------------------------------------------------------

    def header(self) -> dict:
        return {
            "format": "longmem-memory",
            "version": FORMAT_VERSION,
            "batch_size": self.batch_size,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "chunk_size": self.chunk_size,
            "memory_size": self.memory_size,
            "topk_chunks": self.topk_chunks,
            "dtype": str(self.dtype).removeprefix("torch."),
            "backend": self.backend,
            "index": self.index,
            "metric": self.metric,
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "info": self.info,
            "rows": [{"tokens": r.count * self.chunk_size, "pending": self.num_pending(b), "sources": r.sources}
                     for b, r in enumerate(self.rows)],
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the memory to one safetensors file (JSON header in its metadata). Atomic."""
        tensors = {}
        for b, r in enumerate(self.rows):
            if r.count:
                k, v = self.chronological(b)
                tensors[f"row{b}.keys"], tensors[f"row{b}.values"] = k.contiguous().cpu(), v.contiguous().cpu()
            if self.index == "ivf":
                self._ivf_for(b)  # train now if the row is large enough, so every later load uses these centroids
            if b in self.centroids:
                tensors[f"row{b}.ivf_centroids"] = self.centroids[b].contiguous().cpu()
            if r.pending_k is not None:
                tensors[f"row{b}.pending_keys"] = r.pending_k.contiguous().cpu()
                tensors[f"row{b}.pending_values"] = r.pending_v.contiguous().cpu()
        header = self.header()
        header["checksum_scope"] = "tensors+header"
        header["sha256"] = _checksum(tensors, header)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"longmem": json.dumps(header)}), fsync=True)

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu", expect: dict | None = None) -> "MemoryBank":
        """Read a memory written by ``save``. ``expect``: info fields that must match (e.g. the model's)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise LongMemError(f"no memory file at {path}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                header = json.loads(meta["longmem"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except (SafetensorError, KeyError, json.JSONDecodeError, OSError, ValueError) as e:
            raise LongMemError(f"{path} is not a readable LongMem memory file ({type(e).__name__}); it may be truncated or from another program") from None
        if header.get("format") != "longmem-memory":
            raise LongMemError(f"{path} is not a LongMem memory file")
        version = header.get("version")
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            fix = ("it was written by a newer longmem: upgrade longmem to read it" if newer else
                   "no converter exists: rebuild it from its source files (`longmem memory show NAME` lists them) "
                   "with `longmem memory remove NAME`, then `longmem memory add NAME FILE...`")
            raise LongMemError(f"{path} has memory format version {version!r}, this longmem reads version {FORMAT_VERSION}; {fix}")
        covered = header if header.get("checksum_scope") == "tensors+header" else None  # older files: tensors only
        if header.get("sha256") != _checksum(tensors, covered):
            raise LongMemError(f"{path} is damaged: its contents do not match the checksum written with it; rebuild the memory")
        if expect:
            mismatched = {k: (header["info"].get(k), v) for k, v in expect.items() if header["info"].get(k) != v}
            if mismatched:
                raise LongMemError(_mismatch_message(path, mismatched))
        bank = cls(
            batch_size=header["batch_size"], num_heads=header["num_heads"], head_dim=header["head_dim"],
            chunk_size=header["chunk_size"], memory_size=header["memory_size"], topk_chunks=header.get("topk_chunks"),
            dtype=DTYPES[header["dtype"]], device=device, backend=header.get("backend", "auto"), info=header["info"],
            index=header.get("index", "flat"), nlist=header.get("nlist"), nprobe=header.get("nprobe", 64),
            metric=header.get("metric", "ip"),
        )
        for b, meta_row in enumerate(header["rows"]):
            bank.rows[b].sources = list(meta_row.get("sources", []))
            if f"row{b}.ivf_centroids" in tensors:
                bank.centroids[b] = tensors[f"row{b}.ivf_centroids"].float()
            if f"row{b}.keys" in tensors:
                k, v = tensors[f"row{b}.keys"], tensors[f"row{b}.values"]  # (Hkv, N, csz, Dh)
                flat = lambda t: t.reshape(t.shape[0], -1, t.shape[-1]).unsqueeze(0)  # noqa: E731  (1, Hkv, N*csz, Dh)
                bank.add(flat(k), flat(v), rows=[b])
            if f"row{b}.pending_keys" in tensors:
                bank.add(tensors[f"row{b}.pending_keys"].unsqueeze(0), tensors[f"row{b}.pending_values"].unsqueeze(0), rows=[b])
            if bank.num_tokens(b) != meta_row["tokens"] or bank.num_pending(b) != meta_row["pending"]:
                raise LongMemError(f"{path} is inconsistent (row {b}: header and tensors disagree); the file is damaged")
        return bank


def _checksum(tensors: dict, header: dict | None = None) -> str:
    """sha256 over the tensors' names, shapes, dtypes and bytes, in name order, then the header (as canonical
    JSON, without its own sha256) so that sources, sizes and settings are covered too."""
    def parts():
        if header is not None:
            yield json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True).encode()
        for name in sorted(tensors):
            t = tensors[name].contiguous()
            yield f"{name}:{tuple(t.shape)}:{t.dtype};".encode()
            yield t.view(torch.uint8).numpy().tobytes() if t.numel() else b""

    return sha256_bytes(*parts())


def _mismatch_message(path: str, mismatched: dict) -> str:
    what = ", ".join(f"{k}: memory has {have!r}, model has {want!r}" for k, (have, want) in mismatched.items())
    return f"memory {path} belongs to another model ({what}); build a new memory with this model"
