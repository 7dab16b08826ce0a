"""Generation with long-term memory and an incremental KV cache.

The local window holds at most W tokens (the model's segment length). Tokens enter it one step at a
time; the backbone and the SideNet keep the window's keys/values in a ``KVCache``, so a new token
costs one token's forward, not the window's. When the window is full it *slides*: its oldest
W - keep tokens move into the memory (their block-m keys/values, written chunk by chunk; partial
chunks wait in the bank) and the kept tokens are re-encoded once as the start of a fresh window.
The context is unbounded: the window plus everything in memory.

Equivalence, tested: at every step the logits equal a full recompute of the current window (from
scratch, positions from 0) with the same memory. GPT-2's learned positions therefore never exceed W.

Glossary: B rows (prompts, each with its own memory row), W window tokens, S tokens in the window now.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Iterator

import torch

from longmem.errors import LongMemError


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    do_sample: bool = False  # False: greedy
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    stop_token_ids: tuple = ()
    stop_strings: tuple = ()  # needs a tokenizer

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise LongMemError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise LongMemError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LongMemError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LongMemError(f"top_k must be >= 0, got {self.top_k}")


class Decoder:
    """Feeds tokens through a model incrementally: the one decode loop of the package (generation, the CLI chat,
    the harness, the evaluations and the server all decode through it). ``feed`` returns the last token's logits.

    Only the model protocol is used: ``forward(..., cache=)`` with the cache of ``new_cache()``,
    ``write_memory``-free slides (the cache already holds the keys that move into memory).
    """

    def __init__(self, model, batch_size: int, memory=None, window: int | None = None, keep: int | None = None,
                 remember: bool = True):
        """``model``: any model of the protocol (``longmem.model.MemoryLM``). ``memory``: read at every step and, with
        ``remember``, written as the window slides (``remember=False``: read only; slid-out tokens are forgotten).
        ``window`` (default: the model's segment length) and ``keep``: the tokens kept when the window slides
        (default half of it; ``window - 1`` makes every step equal a recompute of the last ``window`` tokens)."""
        self.model = model
        self.remember = remember
        self.W = window or model.segment_length
        self.keep = self.W // 2 if keep is None else keep
        if not 0 <= self.keep < self.W:
            raise LongMemError(f"keep must be in [0, window={self.W}), got {self.keep}")
        limit = model.backbone.max_positions
        if self.W > limit:
            raise LongMemError(f"window {self.W} exceeds the backbone's context {limit}")
        if memory is not None:
            model.check_memory(memory, batch_size)
        self.memory = memory  # MemoryBank or None (then the slid-out tokens are forgotten)
        self.cache = model.new_cache()
        self.tokens = torch.zeros(batch_size, 0, dtype=torch.long, device=model.device)  # (B, S) the window
        self.moved = 0  # tokens moved out of the window so far

    @property
    def tokens_seen(self) -> int:
        """Every token fed so far: those moved out of the window plus those in it."""
        return self.moved + self.tokens.shape[1]

    @torch.no_grad()
    def feed(self, ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Append (B, n) tokens to the stream; returns the logits (B, V) after the last one.

        ``check=False`` skips validating ``ids`` up front (for tokens the model itself just produced);
        ``forward`` still checks each piece.
        """
        return self.feed_all(ids, check)[:, -1]

    @torch.no_grad()
    def feed_all(self, ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        """As ``feed``, but returns the logits (B, n, V) after every one of the n tokens (for scoring a text)."""
        if check:
            for piece in ids.split(self.W, dim=1):  # each piece fits the window; nothing is fed if one is bad
                self.model.check_inputs(piece)
        pieces = []
        while ids.shape[1]:
            room = self.W - self.tokens.shape[1]
            if room == 0:
                self._slide()
                room = self.W - self.tokens.shape[1]
            pieces.append(self._forward(ids[:, :room]))
            ids = ids[:, room:]
        return torch.cat(pieces, dim=1)

    def fork(self) -> "Decoder":
        """A decoder that has read the same tokens, with its own copy of the window's cache (the memory is
        shared and read-only while neither slides): score several continuations of one prefix, each from the
        prefix's cache, without reading the prefix again."""
        other = copy.copy(self)
        other.cache = self.cache.clone()
        return other

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(ids, memory=self.memory, update_memory=False, cache=self.cache)
        self.tokens = torch.cat([self.tokens, ids], dim=1)
        return out.logits.float()  # (B, n, V)

    def flush(self) -> None:
        """Write the window's tokens into the memory too (e.g. at the end of a chat); the window stays."""
        keys, values = self.cache.memory_kv()
        if self.memory is not None and keys is not None:
            self.memory.add(keys, values)

    def _slide(self) -> None:
        """Move the oldest W - keep tokens into memory and restart the window with the rest."""
        move = self.W - self.keep
        if self.memory is not None and self.remember:
            keys, values = self.cache.memory_kv()
            self.memory.add(keys[:, :, :move], values[:, :, :move])  # chunk by chunk
        kept = self.tokens[:, move:]
        self.tokens = self.tokens[:, :0]
        self.cache.reset()
        self.moved += move
        if kept.shape[1]:
            self._forward(kept)  # re-encode the kept tokens as a fresh window (positions from 0)


def sample_next(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits / cfg.temperature
    if cfg.top_k:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > cfg.top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_stream(model, input_ids: torch.Tensor, memory=None, cfg: SamplingConfig | None = None,
                    generator: torch.Generator | None = None, tokenizer=None, window: int | None = None,
                    keep: int | None = None, decoder: Decoder | None = None) -> Iterator[torch.Tensor]:
    """Yield (B,) new tokens step by step. Finished rows (a stop id or string) repeat their stop token.

    ``decoder``: go on from a ``Decoder`` that has already read the start of the prompt (``input_ids`` is
    then the rest of it, at least one token); ``memory``, ``window`` and ``keep`` are the decoder's own."""
    cfg = cfg or SamplingConfig()
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise LongMemError("input_ids must be a non-empty (batch, tokens) tensor of token ids; pad prompts to one length or generate them one by one")
    if cfg.stop_strings and tokenizer is None:
        raise LongMemError("stop_strings need the tokenizer (pass tokenizer=...)")
    was_training = model.training
    model.eval()
    dec = decoder or Decoder(model, input_ids.shape[0], memory, window, keep)
    logits = dec.feed(input_ids.to(model.device))
    B = input_ids.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
    fill = torch.zeros(B, dtype=torch.long, device=logits.device)
    generated = [[] for _ in range(B)]
    stop_ids = set(int(i) for i in cfg.stop_token_ids)
    try:
        for _ in range(cfg.max_new_tokens):
            nxt = sample_next(logits, cfg, generator)
            nxt = torch.where(finished, fill, nxt)
            yield nxt
            for b in range(B):
                if finished[b]:
                    continue
                t = int(nxt[b])
                generated[b].append(t)
                if t in stop_ids or (cfg.stop_strings and _ends_with_stop(tokenizer, generated[b], cfg.stop_strings)):
                    finished[b], fill[b] = True, t
            if bool(finished.all()):
                break
            logits = dec.feed(nxt.view(B, 1), check=False)
    finally:
        model.train(was_training)


def _ends_with_stop(tokenizer, ids: list[int], stops) -> bool:
    tail = tokenizer.decode(ids[-32:])
    return any(s in tail for s in stops)


def generate(model, input_ids: torch.Tensor, memory=None, max_new_tokens: int = 64, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, stop_token_ids=(), stop_strings=(),
             tokenizer=None, generator: torch.Generator | None = None, streamer=None, window: int | None = None,
             keep: int | None = None) -> torch.Tensor:
    """Generate continuations; returns (B, prompt + new) token ids, as HF's ``generate``.

    Args:
        input_ids: (B, T) prompts of one length (one memory row each).
        memory: a MemoryBank with B rows (read, and written as the window slides), or None.
        streamer: callable((B,) tokens) called after every step, for streaming output.
        window, keep: local window size (default: the model's segment length) and tokens kept when it slides.
    """
    cfg = SamplingConfig(max_new_tokens, do_sample, temperature, top_k, top_p, tuple(stop_token_ids), tuple(stop_strings))
    out = [input_ids.to(model.device)]
    for tokens in generate_stream(model, input_ids, memory, cfg, generator, tokenizer, window, keep):
        out.append(tokens.view(-1, 1))
        if streamer is not None:
            streamer(tokens)
    return torch.cat(out, dim=1)
