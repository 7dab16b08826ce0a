"""LongMem as an lm-evaluation-harness model: every harness task, in the three modes of ``longmem eval``.

The model is registered in ``lm_eval``'s model registry as ``longmem`` when this module is imported
(``longmem eval harness`` does it, and passes the model object to ``lm_eval.simple_evaluate``).
Model arguments (``--model-args k=v,...``):

    pretrained    a LongMem checkpoint folder, or a baseline's (default: the shipped longmem-tiny)
    memory        on (LongMem reading its memory), off (same weights, no memory: the local window only)
                  or backbone (the frozen backbone alone on the local window)
    memory_size, chunk_size, topk_chunks   the memory's sizes (default: the checkpoint's)
    device, dtype (float32, bfloat16, float16; default: as saved), batch_size (rows scored side by side)
    prefix_cache  memories of shared prefixes kept (default 4; 0 recomputes every prefix)

How a long context is read (the same rule for every request type; write after read, paper s3.7):

- ``loglikelihood``: a request's score depends on its own context and continuation only, never on the
  other requests of its batch. The local window is what the harness's HF model reads: the last
  ``T + 1`` tokens of context + continuation but the last (T = the model's segment length), so the
  context's last ``T + 1 - len(continuation)`` tokens. ``memory=off`` and ``backbone`` are the plain
  model (the SideNet alone, the backbone alone) on exactly those tokens. With ``memory=on`` the
  earlier part of the context is written into a fresh memory, one local window at a time, oldest
  first (write after read, as ``longmem eval ppl`` streams a document; a last partial chunk waits
  unsearchable), and the continuation is scored in the same window reading it. A context that fits
  the window needs no memory: ``on`` then gives ``off``'s scores. Continuations of one context and
  one length share a split and are scored side by side. A continuation longer than the window is
  scored by streaming context and continuation window by window, as ``loglikelihood_rolling`` does.
- ``loglikelihood_rolling``: lm-eval's own rolling windows (``get_rolling_token_windows`` with one
  token of context, ``make_disjoint_window``), as for every other harness model: the document after
  the end-of-text token, cut into disjoint windows of T inputs (the last reads the last T tokens,
  scoring only the new ones). ``memory=on`` streams them, each window's tokens written into the
  document's memory after the window is read (as ``longmem eval ppl`` streams a document; the last
  window's re-read tokens are then in memory too); ``off`` and ``backbone`` score each window alone.
- ``generate_until``: the context's last ``T - min(max_gen_toks, T/2)`` tokens start the local window,
  the rest goes to memory; every model decodes with the KV-cached ``Decoder`` (``generate_stream``). LongMem's
  window slides into the memory; ``backbone`` mode and the baselines move their window one token at a time and
  only read the memory, which equals recomputing the last window per token (``MemoryLM.decode_into_memory``).

So a few-shot run whose demonstrations overflow the window is the paper's memory-augmented in-context
learning (s4.3): the oldest demonstrations in memory, the latest ones and the test input local.

Shared-prefix memory cache: when requests share a long prefix (the same demonstrations before each test
input), the memory of that prefix, up to its last whole window, is written once and copied per request;
only the rest (less than one window) is written per request. Writing a memory window by window from the
start, the copy plus the rest equals writing the whole prefix afresh, so the scores are exactly those of
recomputation.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
from collections import OrderedDict
from pathlib import Path

import lm_eval
import numpy as np
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, handle_non_serializable, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from longmem.backbone import to_dtype
from longmem.baselines import PlainBackbone
from longmem.dtypes import parse_dtype
from longmem.errors import LongMemError
from longmem.eval.scoring import fill_memory, score_continuations, split_context, window_logits
from longmem.generation import Decoder, SamplingConfig, generate_stream
from longmem.loading import load_model_and_tokenizer, resolve_device
from longmem.tokens import token_ids

log = logging.getLogger(__name__)

MEMORY = {"on": "longmem", "off": "no_memory", "backbone": "backbone"}  # model argument -> scoring mode
DTYPE_ARGS = ("auto", "float32", "bfloat16", "float16")  # "auto": as saved
ARGS = ("pretrained", "memory", "memory_size", "chunk_size", "topk_chunks", "device", "dtype", "batch_size", "prefix_cache")
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")
DEFAULT_MAX_GEN_TOKS = 256  # the harness's own default


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LongMemError(f"model argument {name} must be an integer >= {minimum}, got {value!r}")
    return value


@register_model("longmem")
class LongMemLM(TemplateLM):
    """A LongMem checkpoint (or a baseline's) as an ``lm_eval`` language model. See the module docstring."""

    def __init__(self, pretrained=None, memory: str = "on", memory_size=None, chunk_size=None, topk_chunks=None,
                 device=None, dtype="auto", batch_size=8, prefix_cache=4, **extra):
        super().__init__()
        # lm_eval adds these to every model's arguments; None means "not given"
        for key in ("max_batch_size",):
            extra.pop(key, None)
        if batch_size in (None, "auto"):
            batch_size = 8
        if extra:
            raise LongMemError(f"unknown model argument(s) {', '.join(sorted(extra))} for the longmem model; "
                               f"known: {', '.join(ARGS)}")
        if dtype not in DTYPE_ARGS:
            raise LongMemError(f"model argument dtype must be one of {', '.join(DTYPE_ARGS)}, got {dtype!r}")
        self._check_memory(memory)
        model, tokenizer = load_model_and_tokenizer(pretrained, resolve_device(device))
        if dtype != "auto":
            model = to_dtype(model, parse_dtype(dtype))
        self._configure(model, tokenizer, memory=memory, memory_size=memory_size, chunk_size=chunk_size,
                        topk_chunks=topk_chunks, batch_size=batch_size, prefix_cache=prefix_cache)
        self.pretrained = str(pretrained or "(shipped default)")

    @classmethod
    def from_model(cls, model, tokenizer, memory: str = "on", memory_size=None, chunk_size=None, topk_chunks=None,
                   batch_size=8, prefix_cache=4) -> "LongMemLM":
        """Wrap a model already loaded (``load_model_and_tokenizer``), e.g. to run several modes on one load."""
        self = cls.__new__(cls)
        TemplateLM.__init__(self)
        self._check_memory(memory)
        self._configure(model, tokenizer, memory=memory, memory_size=memory_size, chunk_size=chunk_size,
                        topk_chunks=topk_chunks, batch_size=batch_size, prefix_cache=prefix_cache)
        self.pretrained = getattr(model.backbone, "name", "(loaded model)")
        return self

    @staticmethod
    def _check_memory(memory) -> None:
        if memory not in MEMORY:
            raise LongMemError(f"model argument memory must be on, off or backbone, got {memory!r}")

    def _configure(self, model, tokenizer, *, memory, memory_size, chunk_size, topk_chunks, batch_size, prefix_cache):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.memory, self.mode = memory, MEMORY[memory]
        self.memory_kwargs = {name: _positive(name, value) for name, value in
                              (("memory_size", memory_size), ("chunk_size", chunk_size), ("topk_chunks", topk_chunks))
                              if value is not None}
        if self.memory_kwargs:
            model.config.replace(**self.memory_kwargs)  # LongMemConfig checks them (size a multiple of chunk ...)
        self.chunk_size = self.memory_kwargs.get("chunk_size", model.config.chunk_size)
        self.batch_size = _positive("batch_size", batch_size)
        self.prefix_cache = _positive("prefix_cache", prefix_cache, minimum=0)
        self._cache: OrderedDict = OrderedDict()  # (rows, prefix bytes) -> (prefix ids, memory)
        self.stats = {"prefix_hits": 0, "prefix_tokens_written": 0, "tail_tokens_written": 0}
        self._device = model.device
        self.progress = True  # progress bars (lm_eval asks for them; ``longmem eval harness --no-progress`` does not)

    # -- what lm_eval asks of a model -----------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.model.segment_length

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "longmem").replace("/", "__")

    def get_model_info(self) -> dict:
        return {"model": "longmem", "pretrained": self.pretrained, "memory": self.memory,
                "segment_length": self.model.segment_length, "chunk_size": self.chunk_size, **self.memory_kwargs}

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return token_ids(self.tokenizer, string)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    # -- memories of context prefixes -----------------------------------------------------------------

    def _new_memory(self, rows: int):
        return self.model.new_memory(rows, **self.memory_kwargs)

    def memory_for(self, prefix: np.ndarray, rows: int, writable: bool = False):
        """A fresh memory of ``rows`` identical rows holding ``prefix`` (written one local window at a time).

        With the prefix cache, the prefix up to its last whole window comes from the cache (written once,
        then reused; a longer prefix extends the longest cached one) and only the rest is written here. The
        returned memory may be the cached one itself when nothing is left to write: pass ``writable=True``
        to get a copy that may be changed.
        """
        prefix = np.asarray(prefix, dtype=np.int64)
        if not self.prefix_cache:
            memory = self._new_memory(rows)
            fill_memory(self.model, memory, prefix)
            self.stats["prefix_tokens_written"] += len(prefix)
            return memory
        T = self.model.segment_length
        whole = len(prefix) // T * T
        base = self._cached(prefix[:whole], rows)
        tail = prefix[whole:]
        if not len(tail) and not writable:
            return base
        memory = copy.deepcopy(base)
        fill_memory(self.model, memory, tail)
        self.stats["tail_tokens_written"] += len(tail)
        return memory

    def _cached(self, prefix: np.ndarray, rows: int):
        key = (rows, prefix.tobytes())
        if key in self._cache:
            self._cache.move_to_end(key)
            self.stats["prefix_hits"] += 1
            return self._cache[key][1]
        best = None  # the longest cached prefix of this one (both end at a window boundary)
        for (r, _), (ids, memory) in self._cache.items():
            if r == rows and len(ids) < len(prefix) and np.array_equal(ids, prefix[:len(ids)]):
                if best is None or len(ids) > len(best[0]):
                    best = (ids, memory)
        if best is None:
            memory, done = self._new_memory(rows), 0
        else:
            memory, done = copy.deepcopy(best[1]), len(best[0])
        fill_memory(self.model, memory, prefix[done:])
        self.stats["prefix_tokens_written"] += len(prefix) - done
        self._cache[key] = (prefix, memory)
        while len(self._cache) > self.prefix_cache:
            self._cache.popitem(last=False)
        return memory

    def clear_cache(self) -> None:
        self._cache.clear()

    # -- loglikelihood --------------------------------------------------------------------------------

    def split(self, context: np.ndarray, room: int) -> tuple[np.ndarray, np.ndarray]:
        """(memory part, local part) of a context that leaves ``room`` tokens of the window free (generation)."""
        return split_context(np.asarray(context, dtype=np.int64), self.model.segment_length - room, self.chunk_size)

    def window(self, context: np.ndarray, n_cont: int) -> tuple[np.ndarray, np.ndarray]:
        """(memory part, local part) of a context before a continuation of ``n_cont`` <= T tokens: the local part
        is the context's last T + 1 - n_cont tokens, which with the continuation but its last token fill the
        window's T inputs, as the harness's HF model fills its window; the memory part is all before it."""
        context = np.asarray(context, dtype=np.int64)
        n_mem = max(0, len(context) - (self.model.segment_length + 1 - n_cont))
        return context[:n_mem], context[n_mem:]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Score (context, continuation) token pairs; the continuations of one context and one length (hence one
        split of the context) are scored together."""
        disable_tqdm = disable_tqdm or not self.progress
        groups: dict[tuple, list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            groups.setdefault((tuple(ctx), len(cont)), []).append(i)
        T = self.model.segment_length
        results: list = [None] * len(requests)
        # contexts sharing a long prefix follow each other, shortest first: each extends the last cached prefix
        order = sorted(groups, key=lambda g: (len(g[0]), g))
        for key in tqdm(order, desc=f"longmem {self.memory} loglikelihood", disable=disable_tqdm, leave=False):
            ctx, idxs = key[0], groups[key]
            short = []
            for i in idxs:
                cont = np.asarray(requests[i][2], dtype=np.int64)
                if len(cont) == 0:
                    results[i] = (0.0, True)
                elif len(cont) > T:
                    results[i] = self._score_streamed(np.asarray(ctx, dtype=np.int64), cont)
                else:
                    short.append(i)
            if not short:
                continue
            conts = [np.asarray(requests[i][2], dtype=np.int64) for i in short]
            for i, (lp, greedy) in zip(short, self.score(np.asarray(ctx, dtype=np.int64), conts)):
                results[i] = (lp, greedy)
        for (pair, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", pair, res)
        return results

    @torch.no_grad()
    def score(self, context: np.ndarray, continuations: list[np.ndarray]) -> list[tuple[float, bool]]:
        """(summed log-probability, greedy) of each continuation after ``context``: continuations of one length,
        at most the window's (the context's split depends on that length)."""
        if len({len(c) for c in continuations}) != 1:
            raise LongMemError("score() takes continuations of one length (the split of the context depends on it)")
        mem_ids, local = self.window(context, len(continuations[0]))
        use_memory = self.mode == "longmem" and len(mem_ids) > 0
        mode = self.mode if self.mode != "longmem" or use_memory else "no_memory"  # nothing to remember
        out = []
        for start in range(0, len(continuations), self.batch_size):
            group = continuations[start:start + self.batch_size]
            memory = self.memory_for(mem_ids, len(group)) if use_memory else None
            sc = score_continuations(self.model, mode, local, group, memory, pad_id=self.eot_token_id or 0)
            out += [(float(lp.sum()), bool(np.all(g))) for lp, g in zip(sc.logprobs, sc.greedy)]
        return out

    @torch.no_grad()
    def _score_streamed(self, context: np.ndarray, continuation: np.ndarray) -> tuple[float, bool]:
        """A continuation longer than the window: context and continuation streamed window by window (write after
        read), the continuation's tokens scored wherever they fall."""
        ids = np.concatenate([context, continuation])
        T, n_ctx = self.model.segment_length, len(context)
        memory = self._new_memory(1) if self.mode == "longmem" else None
        total, greedy = 0.0, True
        for start in range(0, len(ids) - 1, T):
            x = torch.as_tensor(ids[start:min(start + T, len(ids) - 1)], device=self.model.device).view(1, -1)
            y = torch.as_tensor(ids[start + 1:start + 1 + x.shape[1]], device=self.model.device)
            logits = (self.model(x, memory=memory).logits if memory is not None
                      else window_logits(self.model, self.mode, x)).float()[0]  # (t, V)
            scored = torch.arange(start + 1, start + 1 + x.shape[1], device=y.device) >= n_ctx
            logp = F.log_softmax(logits, dim=-1).gather(-1, y.view(-1, 1)).squeeze(-1)
            total += float(logp[scored].double().sum())
            greedy &= bool((logits.argmax(-1) == y)[scored].all())
        return total, greedy

    # -- loglikelihood_rolling ------------------------------------------------------------------------

    @torch.no_grad()
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents over lm-eval's rolling windows (see the module docstring)."""
        disable_tqdm = disable_tqdm or not self.progress
        T, results = self.model.segment_length, []
        for req in tqdm(requests, desc=f"longmem {self.memory} rolling", disable=disable_tqdm, leave=False):
            windows = map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(req.args[0]), prefix_token=self.eot_token_id, max_seq_len=T, context_len=1))
            memory = self._new_memory(1) if self.mode == "longmem" else None
            total = 0.0
            for context, continuation in windows:
                ids = np.asarray(context + continuation[:-1], dtype=np.int64)  # (<= T,) what the window reads
                x = torch.as_tensor(ids, device=self.model.device).view(1, -1)
                logits = (self.model(x, memory=memory).logits if memory is not None  # read, then written
                          else window_logits(self.model, self.mode, x)).float()[0, -len(continuation):]  # (n, V)
                target = torch.as_tensor(continuation, device=logits.device).view(-1, 1)
                total += float(F.log_softmax(logits, dim=-1).gather(-1, target).double().sum())
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return results

    # -- generate_until -------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        disable_tqdm = disable_tqdm or not self.progress
        out = []
        for req in tqdm(requests, desc=f"longmem {self.memory} generate", disable=disable_tqdm, leave=False):
            context, gen_kwargs = req.args
            text = self.generate(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    def generate(self, context: str, gen_kwargs: dict) -> str:
        """One continuation of ``context``, cut before the first of ``until`` (as the harness's HF model)."""
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            log.warning("longmem: generation arguments %s are not supported and are ignored", ", ".join(unknown))
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        cfg = SamplingConfig(max_new_tokens=max_new, do_sample=do_sample, temperature=temperature or 1.0,
                             top_k=int(gen_kwargs.get("top_k", 0) or 0), top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0),
                             stop_token_ids=(self.eot_token_id,), stop_strings=tuple(s for s in until if s))
        ctx = np.asarray(self.tok_encode(context) or [self.eot_token_id], dtype=np.int64)
        T = self.model.segment_length
        mem_ids, local = self.split(ctx, max(1, min(max_new, T // 2)))
        net = PlainBackbone(self.model) if self.mode == "backbone" else self.model
        slides = net.decode_into_memory  # else: one token at a time, the memory read only (= recomputing the window)
        memory = None
        if self.mode == "longmem" and len(mem_ids):
            memory = self.memory_for(mem_ids, 1, writable=slides)
        ids = torch.as_tensor(local, device=self.model.device).view(1, -1)
        dec = Decoder(net, 1, memory, keep=None if slides else T - 1, remember=slides)
        new = [int(t[0]) for t in generate_stream(net, ids, cfg=cfg, tokenizer=self.tokenizer, decoder=dec)]
        if self.eot_token_id in new:
            new = new[:new.index(self.eot_token_id)]
        text = self.tokenizer.decode(new)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text


# --------------------------------------------------------------------------- running harness tasks


def parse_model_args(text: str | None) -> dict:
    """``k=v,k=v`` as the harness parses ``--model_args`` (numbers and true/false converted)."""
    try:
        return simple_parse_args_string(text or "")
    except Exception:  # the harness's parser fails on odd input in its own ways
        raise LongMemError(f"cannot read model arguments {text!r}; write them as key=value,key=value") from None


def _near_task_names(name: str, known: list[str], n: int = 3) -> list[str]:
    """Task names a mistyped or unprefixed ``name`` may have meant: ``vt`` -> ``ruler_vt``, ``niah_singel_1`` ->
    ``niah_single_1``."""
    affixed = sorted(k for k in known if k.endswith(f"_{name}") or k.startswith(f"{name}_"))[:n]
    return affixed or difflib.get_close_matches(name, known, n=n, cutoff=0.85)


def evaluate_harness(tasks: list[str], model_args: dict, memories=("on", "off", "backbone"), *, include_path=None,
                     num_fewshot: int | None = None, limit=None, metadata: dict | None = None,
                     progress: bool = True) -> dict:
    """Run harness tasks on one checkpoint in each memory mode (the model is loaded once).

    ``metadata`` goes to the tasks (as the harness's ``--metadata``), after the model arguments and the
    tokenizer's folder (``tokenizer``: what tasks that build their own data, like RULER, size it with).

    Returns ``{"modes": {memory: the harness's results without samples}, "meta": {...}}``.
    """
    args = dict(model_args)
    if "memory" in args:
        memories = [args.pop("memory")]
    for memory in memories:
        LongMemLM._check_memory(memory)
    first = LongMemLM(memory=memories[0], **args)  # checks every argument (and loads the model)
    meta = {**model_args, "tokenizer": first.tokenizer.name_or_path, **(metadata or {})}
    manager = TaskManager(include_path=[str(p) for p in include_path] if include_path else None, metadata=meta)
    missing = [t for t in tasks if not Path(t).is_file() and not manager.match_tasks([t])]
    if missing:
        where = f" or under {', '.join(map(str, include_path))}" if include_path else "; add --include-path DIR for your own"
        near = sorted({n for t in missing for n in _near_task_names(t, manager.all_tasks)})
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise LongMemError(f"unknown harness task(s) {', '.join(missing)}: not among the harness's tasks{where}{hint}")
    report = {"modes": {}, "meta": {"tasks": list(tasks), "model_args": model_args, "num_fewshot": num_fewshot,
                                    "limit": limit, "lm_eval_version": lm_eval.__version__,
                                    "segment_length": first.model.segment_length}}
    for memory in memories:
        lm = first if memory == memories[0] else LongMemLM.from_model(
            first.model, first.tokenizer, memory=memory, batch_size=first.batch_size, prefix_cache=first.prefix_cache,
            **first.memory_kwargs)
        lm.pretrained, lm.progress = first.pretrained, progress
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, verbosity=None, metadata=meta)
        out.pop("samples", None)
        report["modes"][memory] = json.loads(json.dumps(out, default=handle_non_serializable))
    return report


def format_results(report: dict) -> str:
    """One line per task and metric (value +- standard error), one column per memory mode."""
    modes = list(report["modes"])
    first = report["modes"][modes[0]]["results"]
    rows = [(task, key) for task, metrics in first.items() for key in metrics
            if "," in key and "_stderr" not in key and isinstance(metrics[key], (int, float))]
    w = max([24] + [len(f"{t} {k}") + 2 for t, k in rows])

    def cell(task, key, mode):
        r = report["modes"][mode]["results"].get(task, {})
        value, err = r.get(key), r.get(key.replace(",", "_stderr,", 1))
        if not isinstance(value, (int, float)):
            return "-"
        return f"{value:.4f} +- {err:.4f}" if isinstance(err, (int, float)) else f"{value:.4f}"

    lines = [f"{'task metric':<{w}}" + "".join(f"{m:>20}" for m in modes)]
    for task, key in rows:
        lines.append(f"{task + ' ' + key:<{w}}" + "".join(f"{cell(task, key, m):>20}" for m in modes))
    return "\n".join(lines)
