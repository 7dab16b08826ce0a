"""The model side of the server: prompts, generation, scoring and memories, in plain blocking functions.

The HTTP side (``longmem.serve.app``) runs these on worker threads. Everything decodes through
``longmem.generation.generate_stream`` (the one decode path, also behind ``longmem generate``), so greedy
output for a prompt and memory is the CLI's. Log-probabilities (``echo`` + ``logprobs``) come from a
``Decoder`` fed the whole text: the logits at each token equal the incremental decoder's (tested in
tests/test_generation.py), and for a text within the local window they are one forward pass, as
``longmem eval harness`` scores it.

Memories are those of ``longmem memory``: a ``MemoryStore`` per namespace (no API keys: the store folder
itself, so `longmem memory list --home DIR` sees the same memories; with keys: DIR/namespaces/NS). A
request reads its memory from disk (saves are atomic, so it sees a whole memory, old or new) and never
writes back what decoding slid into it. Writers take an in-process lock per memory (requests queue up)
and then the store's file lock (a `longmem memory add` running beside the server makes them wait: 409).
"""

from __future__ import annotations

import datetime
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from longmem.errors import LongMemError
from longmem.generation import Decoder, SamplingConfig, generate_stream
from longmem.serve.errors import APIError
from longmem.store import MemoryStore, check_name, ingest_text
from longmem.tokens import token_ids

# ``longmem chat``'s prefixes: the chat format of a tokenizer without a chat template
PREFIXES = {"system": "System: ", "developer": "System: ", "user": "User: ", "assistant": "Reply: "}


@dataclass
class Limits:
    """What one request may ask for; beyond each, a 4xx that names the limit."""

    max_body_bytes: int = 8 << 20  # a request body (a document to add is the largest)
    max_tokens: int = 4096  # new tokens per request
    max_prompt_tokens: int = 32768  # beyond the local window the prompt slides into a request-private memory
    max_memory_size: int = 1 << 20  # tokens a memory may be created to hold (FIFO); ~0.5 GB at d=1024 fp32
    max_memories: int = 256  # per namespace
    slots: int = 2  # requests on the model at once (threads; torch releases the GIL)
    queue: int = 16  # requests waiting for a slot; one more is answered 429

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "queue" else 1):
                raise LongMemError(f"server limit {name} must be a positive integer, got {value!r}")


@dataclass
class Params:
    """One request's decoding: OpenAI's fields resolved to ``SamplingConfig``'s."""

    max_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    stops: tuple
    seed: int | None

    def config(self, eos: int | None) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_tokens, do_sample=self.temperature > 0,
                              temperature=self.temperature or 1.0, top_p=self.top_p,
                              stop_token_ids=() if eos is None else (eos,), stop_strings=self.stops)


@dataclass
class Result:
    text: str  # the reply, cut before a stop string
    finish_reason: str  # stop (a stop string or the end-of-text token) or length
    prompt_tokens: int
    tokens: list = field(default_factory=list)  # every generated id, the end-of-text token included


class TextStream:
    """Generated tokens -> text pieces: whole UTF-8 characters only, and nothing from the first stop string on
    (text that may be the start of a stop string is held back until it is known not to be)."""

    def __init__(self, decode: Callable[[list], str], stops: tuple):
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.text, self.sent, self.stopped = "", 0, False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._take(len(self.text))
        self.text = text
        safe = len(text)
        while safe and text[safe - 1] == "\ufffd":  # an unfinished UTF-8 character
            safe -= 1
        for s in self.stops:  # the longest tail that could begin a stop string waits
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        return self._take(safe)

    def finish(self) -> str:
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


class Engine:
    def __init__(self, model, tokenizer, store_root, model_id: str, limits: Limits | None = None):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.root = Path(store_root)
        self.model_id = model_id
        self.limits = limits or Limits()
        self.eos = tokenizer.eos_token_id
        self.vocab = model.backbone.vocab_size
        self.info = model.memory_info()
        self.created = int(datetime.datetime.now(datetime.timezone.utc).timestamp())
        self._tokenizer_lock = threading.Lock()  # HF fast tokenizers are not safe to share between threads
        self._locks: dict[tuple, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.closing = threading.Event()  # set at shutdown: running decodes stop at their next token
        MemoryStore(self.root)  # a store path that is a file is refused at start

    # -- text ---------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        with self._tokenizer_lock:
            return list(token_ids(self.tokenizer, text))

    def decode(self, ids) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(ids))

    def prompt_ids(self, prompt) -> list[list[int]]:
        """A completion's ``prompt`` (text, texts, token ids, or lists of token ids) as token-id lists, checked."""
        if isinstance(prompt, str):
            prompts = [self.encode(prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [self.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        if not prompts:
            raise APIError(400, "prompt is empty: give at least one prompt", param="prompt", code="empty_prompt")
        for ids in prompts:
            self.check_prompt(ids)
        return prompts

    def check_prompt(self, ids: list[int], param: str = "prompt") -> None:
        if not ids:
            raise APIError(400, f"{param} is empty: it must hold at least one token", param=param, code="empty_prompt")
        if len(ids) > self.limits.max_prompt_tokens:
            raise APIError(400, f"{param} has {len(ids)} tokens; this server takes at most "
                                f"{self.limits.max_prompt_tokens}", param=param, code="context_length_exceeded")
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= self.vocab:
            raise APIError(400, f"token ids in {param} must lie in [0, {self.vocab}), got values in [{lo}, {hi}]",
                           param=param, code="invalid_token_id")

    def chat_prompt(self, messages) -> tuple[str, tuple]:
        """The prompt text of a conversation and the stops that end a reply in its format."""
        if getattr(self.tokenizer, "chat_template", None):
            with self._tokenizer_lock:
                text = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                                          tokenize=False, add_generation_prompt=True)
            return text, ()
        # no template: `longmem chat`'s format, where a reply is one line
        return "".join(f"{PREFIXES[m.role]}{m.text()}\n" for m in messages) + PREFIXES["assistant"], ("\n",)

    def exchange_text(self, user: str, reply: str) -> str:
        """What ``remember`` writes: the last user message and the reply, in the conversation's format."""
        if getattr(self.tokenizer, "chat_template", None):
            with self._tokenizer_lock:
                return self.tokenizer.apply_chat_template([{"role": "user", "content": user},
                                                           {"role": "assistant", "content": reply}], tokenize=False)
        return f"{PREFIXES['user']}{user}\n{PREFIXES['assistant']}{reply}\n"

    def params(self, body, max_tokens: int | None, default_max: int) -> Params:
        n = default_max if max_tokens is None else max_tokens
        if n > self.limits.max_tokens:
            raise APIError(400, f"max_tokens is {n}; this server generates at most {self.limits.max_tokens} tokens "
                                "per request", param="max_tokens", code="max_tokens_exceeded")
        stops = body.stops()
        if len(stops) > 4:
            raise APIError(400, f"stop takes at most 4 strings, got {len(stops)}", param="stop")
        return Params(max_tokens=n, temperature=1.0 if body.temperature is None else body.temperature,
                      top_p=1.0 if body.top_p is None else body.top_p, stops=stops, seed=body.seed)

    # -- decoding -----------------------------------------------------------------------------------

    def generate(self, ids: list[int], memory, params: Params, cancel: threading.Event,
                 on_text: Callable[[str], None] | None = None) -> Result:
        """Decode a reply with ``generate_stream``; ``on_text`` gets each new piece of text as it comes."""
        stream = TextStream(self.decode, params.stops)
        generator = torch.Generator(device=self.model.device)
        generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
        finish, tokens = "length", []
        steps = generate_stream(self.model, torch.tensor([ids], dtype=torch.long), memory, params.config(self.eos),
                                generator, self.tokenizer)
        for step in steps:
            if cancel.is_set() or self.closing.is_set():
                steps.close()
                break
            token = int(step[0])
            tokens.append(token)
            if token == self.eos:
                finish = "stop"
                break
            piece = stream.push(token)
            if piece and on_text is not None:
                on_text(piece)
            if stream.stopped:
                finish = "stop"
                break
        rest = stream.finish()
        if rest and on_text is not None:
            on_text(rest)
        return Result(stream.text, finish, len(ids), tokens)

    @torch.no_grad()
    def logprobs(self, ids: list[int], memory, top: int) -> dict:
        """OpenAI's ``logprobs`` object for a text: each token's log-probability after the ones before it (the
        first has none) and the ``top`` most likely tokens at each position."""
        dec = Decoder(self.model, 1, memory)
        t = torch.tensor([ids], dtype=torch.long, device=self.model.device)
        token_logprobs, top_logprobs = [None], [None]
        for start in range(0, len(ids), dec.W):
            logp = torch.log_softmax(dec.feed_all(t[:, start:start + dec.W])[0], dim=-1)  # (n, V)
            targets = t[0, start + 1:start + 1 + logp.shape[0]]  # position i predicts token i + 1
            logp = logp[: len(targets)]
            token_logprobs += logp.gather(-1, targets.view(-1, 1)).view(-1).tolist()
            if top:
                values, indices = logp.topk(min(top, logp.shape[-1]), dim=-1)
                for v, i in zip(values.tolist(), indices.tolist()):
                    top_logprobs.append({self.decode([j]): lp for j, lp in zip(i, v)})
            else:
                top_logprobs += [{} for _ in range(len(targets))]
        tokens = [self.decode([i]) for i in ids]
        offsets, at = [], 0
        for s in tokens:
            offsets.append(at)
            at += len(s)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}

    # -- memories -----------------------------------------------------------------------------------

    def store(self, namespace: str | None) -> MemoryStore:
        return MemoryStore(self.root if namespace is None else self.root / "namespaces" / namespace)

    @staticmethod
    def checked_name(name, param: str = "name") -> str:
        try:
            return check_name(name)
        except LongMemError as e:
            raise APIError(400, str(e), param=param, code="invalid_memory_name") from None

    def header(self, namespace, name: str, param: str = "memory") -> dict:
        """A memory's header, checked: it exists in this namespace (else 404) and this model built it."""
        store = self.store(namespace)
        self.checked_name(name, param)
        if not store.exists(name):
            raise APIError(404, f"no memory named {name!r}; create it with POST /v1/memories or add a document "
                                f"with POST /v1/memories/{name}/documents", param=param, code="memory_not_found")
        try:
            header = store.header(name)
        except LongMemError:
            raise APIError(409, f"memory {name!r} is unreadable; delete it with DELETE /v1/memories/{name}",
                           param=param, code="memory_unreadable") from None
        info = header.get("info", {})
        if any(info.get(k) != v for k, v in self.info.items() if k in ("fingerprint", "memory_layer")):
            raise APIError(400, f"memory {name!r} was built by another model ({info.get('model')!r}, fingerprint "
                                f"{info.get('fingerprint')}); this server runs {self.info['model']!r} (fingerprint "
                                f"{self.info['fingerprint']}): build a new memory with this model",
                           param=param, code="memory_model_mismatch")
        return header

    def open_memory(self, namespace, name: str | None):
        """The memory a request reads (None: no memory), loaded whole from disk."""
        if name is None:
            return None
        self.header(namespace, name)
        try:
            return self.store(namespace).load(name, self.model)
        except LongMemError:
            raise APIError(409, f"memory {name!r} is unreadable; delete it with DELETE /v1/memories/{name}",
                           param="memory", code="memory_unreadable") from None

    def describe(self, namespace, name: str) -> dict:
        h = self.header(namespace, name, "name")
        row = h["rows"][0]
        return {"object": "memory", "name": name, "tokens": row["tokens"], "pending": row["pending"],
                "sources": row["sources"], "bytes": h["bytes"], "modified": h["modified"],
                "memory_size": h["memory_size"], "chunk_size": h["chunk_size"], "model": h["info"].get("model"),
                "fingerprint": h["info"].get("fingerprint")}

    def list_memories(self, namespace) -> list[dict]:
        out = []
        for name in self.store(namespace).names():
            try:
                out.append(self.describe(namespace, name))
            except APIError as e:  # listed, with why it cannot be used
                out.append({"object": "memory", "name": name, "error": e.message})
        return out

    def writing(self, namespace, name: str):
        """Serialise writers of one memory: the in-process lock (waits), then the store's file lock (a CLI writer
        holding it: 409)."""
        key = (namespace, name)
        with self._locks_guard:
            lock = self._locks.setdefault(key, threading.Lock())
        return _Writing(lock, self.store(namespace), name)

    def create(self, namespace, name: str, memory_size: int | None) -> dict:
        self.checked_name(name)
        store = self.store(namespace)
        if memory_size is not None and memory_size > self.limits.max_memory_size:
            raise APIError(400, f"memory_size {memory_size} is over this server's limit of {self.limits.max_memory_size} "
                                "tokens", param="memory_size", code="memory_too_large")
        with self.writing(namespace, name):
            if store.exists(name):
                raise APIError(409, f"a memory named {name!r} exists already", param="name", code="memory_exists")
            if len(store.names()) >= self.limits.max_memories:
                raise APIError(400, f"this namespace holds {self.limits.max_memories} memories, the server's limit; "
                                    "delete one first", param="name", code="too_many_memories")
            try:
                bank = self.model.new_memory(1, memory_size=memory_size)
            except LongMemError as e:
                raise APIError(400, str(e), param="memory_size", code="invalid_memory_size") from None
            store.save(name, bank)
        return self.describe(namespace, name)

    def delete(self, namespace, name: str) -> dict:
        self.checked_name(name)
        store = self.store(namespace)
        with self.writing(namespace, name):
            if not store.exists(name):
                self.header(namespace, name, "name")  # the 404
            store.path(name).unlink()
        return {"object": "memory.deleted", "name": name, "deleted": True}

    def add_text(self, namespace, name: str, text: str, source: str) -> tuple[int, dict]:
        """Write text into a memory (created when new, as `longmem memory add` does); returns (tokens written, the
        memory's description) once the memory is on disk."""
        self.checked_name(name)
        store = self.store(namespace)
        with self.writing(namespace, name):
            if store.exists(name):
                bank = self.open_memory(namespace, name)
            elif len(store.names()) >= self.limits.max_memories:
                raise APIError(400, f"this namespace holds {self.limits.max_memories} memories, the server's limit; "
                                    "delete one first", param="name", code="too_many_memories")
            else:
                bank = self.model.new_memory(1)
            n = ingest_text(self.model, self.tokenizer, bank, text)
            bank.rows[0].sources.append({"file": source, "tokens": n, "added": now()})
            store.save(name, bank)  # atomic, flushed to disk: only then is the add acknowledged
        return n, self.describe(namespace, name)


class _Writing:
    def __init__(self, lock: threading.Lock, store: MemoryStore, name: str):
        self.lock, self.store, self.name = lock, store, name
        self.held = None

    def __enter__(self):
        self.lock.acquire()
        try:
            self.held = self.store.lock(self.name)
            self.held.__enter__()
        except LongMemError:
            self.lock.release()
            raise APIError(409, f"memory {self.name!r} is being written by another program; try again shortly",
                           param="name", code="memory_busy", headers={"Retry-After": "1"}) from None
        return self

    def __exit__(self, *exc):
        try:
            self.held.__exit__(*exc)
        finally:
            self.lock.release()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
