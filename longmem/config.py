"""LongMem hyper-parameters (paper section 3).

| paper symbol | field            | paper value |
|--------------|------------------|-------------|
| m            | memory_layer     | 17 of 24 (None here: the odd block nearest 0.7 * L) |
| csz          | chunk_size       | 4 (2 for in-context learning) |
| M            | memory_size      | 65,536 tokens |
| k_c          | topk_chunks      | 16 (K = k_c * csz = 64 retrieved tokens) |
| T            | segment_length   | 1024 (None here: min(1024, the backbone's context)) |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from longmem.errors import LongMemError

BACKENDS = ("auto", "faiss", "torch")
METRICS = ("ip", "cosine")
QUERIES = ("query", "key")
INITS = ("paper", "identity", "memory-delta")
IDENTITY_INITS = ("identity", "memory-delta")  # the starts where the untrained SideNet is the backbone (residual scales)


@dataclass
class LongMemConfig:
    memory_layer: int | None = None  # backbone block m whose keys/values are cached (0-based, odd)
    chunk_size: int = 4  # tokens per memory chunk; a chunk is retrieved whole
    memory_size: int = 65536  # tokens kept per memory row (FIFO); a multiple of chunk_size
    topk_chunks: int = 16  # chunks retrieved per query token and head; the model reads it at each search (a memory has none)
    segment_length: int | None = None  # local window T used by training/evaluation streams
    retrieval_backend: str = "auto"  # faiss on CPU, torch (matmul + top-k) on GPU tensors
    # chunk search score: "ip" = inner product with the chunk-mean key (the paper); "cosine" = with the unit-length
    # chunk-mean key, so a few large-norm keys cannot win every search (RESULTS.md, "Why key retrieval")
    retrieval_metric: str = "ip"
    # what searches the memory: "query" = the memory layer's query projection (the paper); "key" = the backbone's own
    # block-m key of each token, the space the stored keys live in, so a repeated context finds where it was seen
    # (RESULTS.md, "Why key retrieval"); the retrieved tokens are attended to with the query either way
    retrieval_query: str = "query"
    # also attend to the chunk stored right after each retrieved one (not in the paper): with key search the chunk
    # found holds the token seen before, and the one to copy is its successor, in the next chunk 1 time in csz
    # (RESULTS.md, "Why recall is hard for this model"). K doubles; a successor that is itself retrieved is taken once.
    retrieval_next: bool = False
    # how the SideNet starts: "paper" = copies of the backbone's odd blocks (section 3.2); "identity" = the same copies
    # behind a residual scale alpha_i = 0 each, so that the untrained SideNet's logits are the backbone's (not in the paper);
    # "memory-delta" = identity, with the memory block adding only what reading memory changes, so that without memory
    # the SideNet stays the backbone whatever is trained (sidenet.py)
    sidenet_init: str = "paper"

    def __post_init__(self):
        if self.memory_layer is not None:
            if not isinstance(self.memory_layer, int) or self.memory_layer < 1 or self.memory_layer % 2 == 0:
                raise LongMemError(
                    f"memory_layer must be an odd block index >= 1 (SideNet layer (m-1)/2 reads it), "
                    f"got {self.memory_layer!r}"
                )
        for name in ("chunk_size", "memory_size", "topk_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LongMemError(f"{name} must be a positive integer, got {value!r}")
        if self.memory_size % self.chunk_size:
            raise LongMemError(
                f"memory_size ({self.memory_size}) must be a multiple of chunk_size ({self.chunk_size})"
            )
        if self.segment_length is not None and (not isinstance(self.segment_length, int) or self.segment_length < 1):
            raise LongMemError(f"segment_length must be a positive integer, got {self.segment_length!r}")
        if self.retrieval_metric not in METRICS:
            raise LongMemError(f"retrieval_metric must be one of {METRICS}, got {self.retrieval_metric!r}")
        if self.retrieval_query not in QUERIES:
            raise LongMemError(f"retrieval_query must be one of {QUERIES}, got {self.retrieval_query!r}")
        if not isinstance(self.retrieval_next, bool):
            raise LongMemError(f"retrieval_next must be true or false, got {self.retrieval_next!r}")
        if self.sidenet_init not in INITS:
            raise LongMemError(f"sidenet_init must be one of {INITS}, got {self.sidenet_init!r}")
        if self.retrieval_backend not in BACKENDS:
            raise LongMemError(f"retrieval_backend must be one of {BACKENDS}, got {self.retrieval_backend!r}")

    @property
    def retrieved_tokens(self) -> int:
        """K: memory tokens each query attends to."""
        return self.topk_chunks * self.chunk_size * (2 if self.retrieval_next else 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LongMemConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise LongMemError(f"unknown LongMem config fields {sorted(unknown)}; is this file from a newer longmem?")
        return cls(**d)

    def replace(self, **changes) -> "LongMemConfig":
        return dataclasses.replace(self, **changes)


def default_memory_layer(num_layers: int) -> int:
    """The odd block nearest 0.7 * L (the paper: 17 of 24), at most the last odd block."""
    if num_layers < 2:
        raise LongMemError(f"a LongMem backbone needs at least 2 layers, this one has {num_layers}")
    target = 0.7 * num_layers
    odd = [i for i in range(1, num_layers, 2)]
    return min(odd, key=lambda i: (abs(i - target), -i))
