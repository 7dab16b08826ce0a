"""Long-context perplexity: documents streamed in segments, memory reset per document (paper s4.1), in the three
modes, by position and by document length, for LongMem checkpoints and plain HF baselines. The streaming loss
itself (``stream_nll``, ``NLL``) lives in ``longmem.stream_loss``, below training and evaluation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import AutoModelForCausalLM, AutoTokenizer

from longmem.baselines import PlainBackbone
from longmem.data.streams import encode_documents
from longmem.errors import LongMemError
from longmem.eval.scoring import MODES
from longmem.loading import load_model_and_tokenizer
from longmem.stream_loss import BUCKETS, NLL, bucket_name, stream_nll

# document-length splits in tokens (the paper's PG-22 splits, and the shorter documents)
LENGTH_SPLITS = (("<5K", 0, 5_000), ("5K-10K", 5_000, 10_000), ("10K-100K", 10_000, 100_000),
                 ("100K-500K", 100_000, 500_000), ("500K-1M", 500_000, 1_000_000), (">1M", 1_000_000, None))


def _load_baseline(path: str, device):
    if not Path(path).is_dir():
        raise LongMemError(f"baseline {path} is not a folder; give a HF causal LM saved with save_pretrained (with its tokenizer)")
    try:
        tok = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForCausalLM.from_pretrained(path)
    except Exception as e:  # any HF loading failure is the same to the user
        first = str(e).splitlines()[0] if str(e) else ""
        raise LongMemError(f"cannot load baseline {path} as a causal LM with a tokenizer ({type(e).__name__}: {first})") from None
    return hf.to(device).eval(), tok


def _same_tokens(tok_a, tok_b, docs_a: list, data) -> bool:
    """Whether tokenizer b gives exactly tokenizer a's ids: the same vocabulary, the same ids for every document."""
    if tok_a.get_vocab() != tok_b.get_vocab():
        return False
    docs_b = encode_documents(data, tok_b)
    return len(docs_b) == len(docs_a) and all(np.array_equal(a, b) for a, b in zip(docs_a, docs_b))


def _merge(stats: list):
    out = NLL(stats[0].segment_length)
    for s in stats:
        out.total += s.total
        out.tokens += s.tokens
        out.beyond += s.beyond
        out.beyond_tokens += s.beyond_tokens
        for name, (nll, n) in s.buckets.items():
            out.buckets[name][0] += nll
            out.buckets[name][1] += n
    return out


def _by_length(docs) -> dict[str, list]:
    groups = {}
    for name, lo, hi in LENGTH_SPLITS:
        sel = [d for d in docs if len(d) >= lo and (hi is None or len(d) < hi)]
        if sel:
            groups[name] = sel
    return groups


def _score(model, groups: dict, mode: str, batch_size: int, memory_kwargs: dict | None, progress: bool, desc: str,
           segment_length: int | None = None) -> dict:
    stats = {name: stream_nll(model, docs, mode, segment_length=segment_length, batch_size=batch_size,
                              memory_kwargs=memory_kwargs, progress=progress, desc=f"{desc} {name}")
             for name, docs in groups.items()}
    summary = _merge(list(stats.values())).summary()
    summary["by_length"] = {}
    for name, s in stats.items():
        one = s.summary()
        summary["by_length"][name] = {"ppl": one["ppl"], "ppl_beyond_window": one["ppl_beyond_window"],
                                      "tokens": one["tokens"], "documents": len(groups[name])}
    return summary


def run_ppl(model_paths: list, data: list, *, baselines=(), max_tokens: int | None = None, batch_size: int = 1,
            memory_kwargs: dict | None = None, device=None, progress: bool = False, warn=None) -> dict:
    """Perplexity of every model in the three modes (and of each baseline) on ``data``.

    One model: ``{"longmem": S, "no_memory": S, "backbone": S, "baseline:NAME": S, "meta": {...}}``; several:
    the same summaries under ``"<model name>/<mode>"`` keys. Each S is ``NLL.summary()`` plus ``by_length``:
    ``{split: {"ppl", "ppl_beyond_window", "tokens", "documents"}}`` for the non-empty ``LENGTH_SPLITS``.
    ``warn(message)`` is told about skipped documents."""
    model_paths = list(model_paths) or [None]
    names = [Path(p).name if p else "longmem-tiny" for p in model_paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in model_paths]
    report, meta = {}, {"data": [str(d) for d in data], "max_tokens": max_tokens, "models": {}}
    for bpath in baselines:  # before any model is scored
        if not Path(bpath).is_dir():
            raise LongMemError(f"baseline {bpath} is not a folder; give a HF causal LM saved with save_pretrained (with its tokenizer)")
    loaded_baselines = {}
    for path, name in zip(model_paths, names):
        model, tok = load_model_and_tokenizer(path, device)
        kw = dict(memory_kwargs or {})
        if kw:
            model.config.replace(**kw)  # LongMemConfig validates the sizes
        T = model.segment_length
        full = encode_documents(data, tok, progress=progress)
        docs = [d[:max_tokens] if max_tokens else d for d in full]
        short = sum(len(d) <= T for d in docs)
        docs = [d for d in docs if len(d) > T]
        if not docs:
            raise LongMemError(f"no document in {', '.join(map(str, data))} is longer than one local window ({T} tokens) of {name}; give longer documents")
        if short and warn is not None:
            warn(f"{name}: skipped {short} document(s) of at most {T} tokens (one local window: nothing beyond it for the memory to help)")
        groups = _by_length(docs)
        prefix = "" if len(model_paths) == 1 else f"{name}/"
        for mode in MODES:
            report[prefix + mode] = _score(model, groups, mode, batch_size, kw, progress, f"{name} {mode}")
        for bpath in baselines:
            if bpath not in loaded_baselines:
                loaded_baselines[bpath] = _load_baseline(bpath, device)
            hf, btok = loaded_baselines[bpath]
            limit = getattr(hf.config, "max_position_embeddings", None) or getattr(hf.config, "n_positions", None)
            if limit is not None and limit < T:
                raise LongMemError(f"baseline {bpath} reads at most {limit} tokens, less than the local window ({T}) of {name}")
            if not _same_tokens(tok, btok, full, data):
                raise LongMemError(f"baseline {bpath} has another tokenizer than {name}; perplexities over different tokens are "
                                   "not comparable: give a baseline that uses the same tokenizer")
            bname = f"baseline:{Path(bpath).name}"
            report[prefix + bname] = _score(PlainBackbone.from_causal_lm(hf, T), groups, "backbone", batch_size, None, progress, f"{name} {bname}", T)
        meta["models"][name] = {"path": str(path) if path else "(shipped default)", "segment_length": T,
                                "memory_size": kw.get("memory_size", model.config.memory_size),
                                "chunk_size": kw.get("chunk_size", model.config.chunk_size),
                                "topk_chunks": kw.get("topk_chunks", model.config.topk_chunks),
                                "documents": len(docs), "skipped_documents": short,
                                "document_tokens": int(np.sum([len(d) for d in docs]))}
    report["meta"] = meta
    return report


def format_ppl(report: dict) -> str:
    buckets = [bucket_name(*b) for b in BUCKETS]
    rows = [k for k in report if k != "meta"]
    w = max(12, max(len(k) for k in rows) + 2)
    fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    lines = [f"{'':<{w}}{'ppl':>10}{'beyond T':>10}" + "".join(f"{'win ' + b:>11}" for b in buckets) + f"{'tokens':>10}"]
    for k in rows:
        s = report[k]
        lines.append(f"{k:<{w}}{fmt(s['ppl']):>10}{fmt(s['ppl_beyond_window']):>10}"
                     + "".join(f"{fmt(s['ppl_by_position'][b]):>11}" for b in buckets) + f"{s['tokens']:>10}")
    splits = [name for name, _, _ in LENGTH_SPLITS if any(name in report[k]["by_length"] for k in rows)]
    if splits:
        lines += ["", "by document length (tokens): ppl (documents)",
                  f"{'':<{w}}" + "".join(f"{s:>16}" for s in splits)]
        for k in rows:
            bl = report[k]["by_length"]
            cells = [f"{fmt(bl[s]['ppl'])} ({bl[s]['documents']})" if s in bl else "-" for s in splits]
            lines.append(f"{k:<{w}}" + "".join(f"{c:>16}" for c in cells))
    return "\n".join(lines)
