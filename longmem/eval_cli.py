"""``longmem eval``: the paper's evaluations (LONGMEM.md s6) on LongMem checkpoints.

    longmem eval ppl                 long-context perplexity (PG-22 style length splits)
    longmem eval chapterbreak        ChapterBreak suffix identification (longmem.chapterbreak)
    longmem eval chapterbreak-build  ChapterBreak-format examples from any book with chapters
    longmem eval icl                 memory-augmented in-context learning (longmem.icl)
    longmem eval passkey             pass-key retrieval beyond the local window (longmem.passkey)

Every evaluation compares three modes of one checkpoint on the same tokens: ``longmem`` (SideNet
reading the memory), ``no_memory`` (same weights, no retrieval) and ``backbone`` (the frozen LM).

``ppl --json`` layout. One ``--model``: ``{"longmem": S, "no_memory": S, "backbone": S,
"baseline:NAME": S, "meta": {...}}``. Several: the same summaries under ``"<model name>/<mode>"``
keys (model name = the folder's name), and ``"meta"``. Each summary S is ``NLL.summary()`` of
``longmem.evaluate`` (``ppl``, ``ppl_beyond_window``, ``loss``, ``tokens``, ``tokens_beyond_window``,
``ppl_by_position``, ``tokens_by_position``) plus ``by_length``: ``{split: {"ppl",
"ppl_beyond_window", "tokens", "documents"}}`` for the non-empty document-length splits.

Every result file (``--json`` of each task, and of ``longmem perplexity``, ``demo`` and ``staleness``)
also holds ``longmem_version`` (the package that wrote it), ``format_version`` (``RESULT_FORMAT``) and
``sha256``: the hex sha256 of the canonical JSON (sorted keys, no spaces) of everything else in the
file. ``verify_result(path)`` checks it: a truncated or altered file is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from longmem.errors import LongMemError

MODES = ("longmem", "no_memory", "backbone")
RESULT_FORMAT = 1  # layout of a sealed result file (see the module docstring); bump when it changes
SEAL = ("longmem_version", "format_version", "sha256")  # the keys write_result adds to a report
# document-length splits in tokens (the paper's PG-22 splits, and the shorter documents)
LENGTH_SPLITS = (("<5K", 0, 5_000), ("5K-10K", 5_000, 10_000), ("10K-100K", 10_000, 100_000),
                 ("100K-500K", 100_000, 500_000), ("500K-1M", 500_000, 1_000_000), (">1M", 1_000_000, None))


def warn(msg: str) -> None:
    print(f"longmem eval: warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- shared plumbing


def resolve_device(name: str | None):
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LongMemError(f"unknown device {name!r}; use cpu or cuda (cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LongMemError(f"--device {name} asked for, but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise LongMemError(f"unsupported device {name!r}; use cpu or cuda")
    return device


def load_model(path, device, dtype=None):
    """A LongMem checkpoint (default: the shipped one) and its tokenizer, on ``device``, in eval mode."""
    from longmem.demo import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(path, dtype=dtype)
    return model.to(device).eval(), tokenizer


def memory_args(args) -> dict:
    """``--memory-size/--chunk-size/--topk-chunks`` as ``new_memory`` keyword arguments (only those given)."""
    return {k: getattr(args, k) for k in ("memory_size", "chunk_size", "topk_chunks") if getattr(args, k, None) is not None}


def at_least_one(args, *names: str) -> None:
    """Counts given on the command line are >= 1 (a 0 or a negative would slice the wrong examples)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise LongMemError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def checked(model, memory_kwargs: dict) -> dict:
    """``memory_kwargs`` after LongMemConfig's validation against ``model`` (e.g. size a multiple of chunk)."""
    if memory_kwargs:
        model.config.replace(**memory_kwargs)
    return memory_kwargs


def check_output(path, flag: str = "--json") -> None:
    """Refuse an output path that cannot be written, before the evaluation spends any time."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise LongMemError(f"{flag} {path} is a folder; give a file name")
    above = next((q for q in path.parents if q.exists()), None)
    if above is not None and not above.is_dir():
        raise LongMemError(f"{flag} {path}: {above} is a file, not a folder")


def write_json(path, obj) -> None:
    """``obj`` as JSON in ``path``, atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _digest(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def write_result(path, report: dict) -> dict:
    """Write an evaluation report with its version and checksum (module docstring); returns what was written."""
    from longmem import __version__

    body = {k: v for k, v in report.items() if k not in SEAL}
    body = json.loads(json.dumps({**body, "longmem_version": __version__, "format_version": RESULT_FORMAT}))  # as read back
    body["sha256"] = _digest(body)
    write_json(path, body)
    return body


def verify_result(path) -> dict:
    """The report written to ``path`` by ``write_result`` (without the ``SEAL`` keys), once its checksum
    shows the file whole and unaltered.

    Raises:
        LongMemError: the file is missing, truncated, not JSON, unsealed, of an unknown format or altered.
    """
    path = Path(path)
    if not path.is_file():
        raise LongMemError(f"{path} is not a file; give a result file written by `longmem eval ... --json`")
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LongMemError(f"{path} is truncated or not JSON ({e}); rerun the evaluation") from None
    if not isinstance(body, dict) or not isinstance(body.get("sha256"), str):
        raise LongMemError(f"{path} carries no checksum; it was not written by `longmem eval ... --json` (or by an older longmem): rerun the evaluation")
    if body.get("format_version") != RESULT_FORMAT:
        raise LongMemError(f"{path} has result format version {body.get('format_version')!r}, this longmem reads version "
                           f"{RESULT_FORMAT}; use the longmem that wrote it ({body.get('longmem_version', '?')})")
    want = body.pop("sha256")
    if _digest(body) != want:
        raise LongMemError(f"{path} is damaged or was edited: its contents do not match the checksum written with it; rerun the evaluation")
    return {k: v for k, v in body.items() if k not in SEAL}


def _plot_lines(path, xs: list[str], lines: dict[str, list], xlabel: str, ylabel: str, title: str, hline=None,
                dashed: str | None = None):
    """One line per entry of ``lines`` over the categories ``xs`` (None values skipped); labels holding
    ``dashed`` are drawn dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, ys in lines.items():
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        if pts:
            style = "--" if dashed and dashed in label else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, linestyle=style)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", label="chance")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_bars(path, groups: list[str], series: dict[str, list], errors: dict[str, list] | None, ylabel: str, title: str,
               hline=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, ys) in enumerate(series.items()):
        ax.bar(x + i * width - 0.4 + width / 2, ys, width, yerr=(errors or {}).get(name), label=name, capsize=3)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", label="chance")
    if len(groups) > 5:  # long rows of labels would overlap
        ax.set_xticks(x, groups, rotation=35, ha="right")
    else:
        ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- ppl


class _PlainLM:
    """A plain HF causal LM dressed for ``stream_nll``'s backbone mode: each window on its own."""

    training = False

    def __init__(self, hf, segment_length: int):
        self.hf, self.segment_length = hf, segment_length

    @property
    def device(self):
        return next(self.hf.parameters()).device

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def backbone_logits(self, ids):
        import torch

        with torch.no_grad():
            return self.hf(input_ids=ids).logits


def _load_baseline(path: str, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
    import numpy as np

    from longmem.streams import encode_documents

    if tok_a.get_vocab() != tok_b.get_vocab():
        return False
    docs_b = encode_documents(data, tok_b)
    return len(docs_b) == len(docs_a) and all(np.array_equal(a, b) for a, b in zip(docs_a, docs_b))


def _merge(stats: list):
    from longmem.evaluate import NLL

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
    from longmem.evaluate import stream_nll

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
            memory_kwargs: dict | None = None, device=None, progress: bool = False) -> dict:
    """Perplexity of every model in the three modes (and of each baseline) on ``data``; see the module docstring."""
    import numpy as np

    from longmem.streams import encode_documents

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
        model, tok = load_model(path, device)
        kw = checked(model, dict(memory_kwargs or {}))
        T = model.segment_length
        full = encode_documents(data, tok, progress=progress)
        docs = [d[:max_tokens] if max_tokens else d for d in full]
        short = sum(len(d) <= T for d in docs)
        docs = [d for d in docs if len(d) > T]
        if not docs:
            raise LongMemError(f"no document in {', '.join(map(str, data))} is longer than one local window ({T} tokens) of {name}; give longer documents")
        if short:
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
            report[prefix + bname] = _score(_PlainLM(hf, T), groups, "backbone", batch_size, None, progress, f"{name} {bname}", T)
        meta["models"][name] = {"path": str(path) if path else "(shipped default)", "segment_length": T,
                                "memory_size": kw.get("memory_size", model.config.memory_size),
                                "chunk_size": kw.get("chunk_size", model.config.chunk_size),
                                "topk_chunks": kw.get("topk_chunks", model.config.topk_chunks),
                                "documents": len(docs), "skipped_documents": short,
                                "document_tokens": int(np.sum([len(d) for d in docs]))}
    report["meta"] = meta
    return report


def format_ppl(report: dict) -> str:
    from longmem.evaluate import BUCKETS, bucket_name

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


def _run_ppl(args) -> int:
    from longmem.evaluate import BUCKETS, bucket_name

    if args.max_tokens is not None and args.max_tokens < 2:
        raise LongMemError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    if args.batch_size < 1:
        raise LongMemError(f"--batch-size must be at least 1, got {args.batch_size}")
    check_output(args.json)
    check_output(args.plot, "--plot")
    report = run_ppl(args.model or [], args.data, baselines=args.baseline or [], max_tokens=args.max_tokens,
                     batch_size=args.batch_size, memory_kwargs=memory_args(args), device=resolve_device(args.device),
                     progress=args.progress)
    print(format_ppl(report))
    if args.json:
        write_result(args.json, report)
    if args.plot:
        buckets = [bucket_name(*b) for b in BUCKETS]
        lines = {k: [v["ppl_by_position"][b] for b in buckets] for k, v in report.items() if k != "meta"}
        _plot_lines(args.plot, buckets, lines, "position in document (local windows)", "token perplexity",
                    "Perplexity by position")
    return 0


# --------------------------------------------------------------------------- chapterbreak


def _run_chapterbreak(args) -> int:
    from longmem.chapterbreak import evaluate_chapterbreak, load_chapterbreak

    at_least_one(args, "max_examples", "max_context_tokens")
    check_output(args.json)
    check_output(args.plot, "--plot")
    examples = load_chapterbreak(args.data, args.split)
    if args.max_examples:
        examples = examples[: args.max_examples]
    model, tok = load_model(args.model, resolve_device(args.device), args.dtype)
    report = evaluate_chapterbreak(model, tok, examples, memory_kwargs=checked(model, memory_args(args)),
                                   max_candidate_tokens=args.max_candidate_tokens, max_context_tokens=args.max_context_tokens,
                                   progress=args.progress)
    report["meta"] = {"data": str(args.data), "split": args.split, "model": str(args.model or "(shipped default)"),
                      "segment_length": model.segment_length}
    print(f"ChapterBreak {args.split}: {report['longmem']['examples']} examples, chance {report['longmem']['chance']:.3f}")
    print(f"{'mode':<12}{'acc (sum logp)':>16}{'acc (mean logp)':>17}")
    for mode in MODES:
        r = report[mode]
        print(f"{mode:<12}{r['accuracy_sum']:>16.3f}{r['accuracy_mean']:>17.3f}"
              + "".join(f"   {s}: {v['accuracy_sum']:.3f}/{v['accuracy_mean']:.3f}" for s, v in r["by_split"].items()))
    if args.json:
        write_result(args.json, report)
    if args.plot:
        _plot_bars(args.plot, list(MODES), {"sum log-prob": [report[m]["accuracy_sum"] for m in MODES],
                                            "mean log-prob": [report[m]["accuracy_mean"] for m in MODES]},
                   None, "accuracy", f"ChapterBreak ({args.split})", hline=report["longmem"]["chance"])
    return 0


def _run_build(args) -> int:
    from longmem.chapterbreak import build_examples, read_book

    if args.split not in ("ao3", "pg19"):
        raise LongMemError(f"unknown split {args.split!r}; choose ao3 or pg19")
    at_least_one(args, "negatives", "context_chars", "candidate_words", "max_examples")
    check_output(args.out, "--out")
    book_id, text = read_book(args.book, args.id, args.data_root)
    examples = build_examples(text, negatives=args.negatives, context_chars=args.context_chars,
                              candidate_words=args.candidate_words, seed=args.seed)
    if args.max_examples:
        examples = examples[: args.max_examples]
    out = {"pg19": {}, "ao3": {}}
    out[args.split][book_id] = examples
    write_json(args.out, out)
    print(f"{len(examples)} ChapterBreak examples from {book_id} -> {args.out} (split {args.split})")
    return 0


# --------------------------------------------------------------------------- icl


def _run_icl(args) -> int:
    from longmem.icl import evaluate_icl, get_task, load_examples

    task = get_task(args.task)
    at_least_one(args, "max_test")
    check_output(args.json)
    check_output(args.plot, "--plot")
    test = load_examples(args.data, task)
    pool = load_examples(args.train, task)
    if args.max_test:
        test = test[: args.max_test]
    model, tok = load_model(args.model, resolve_device(args.device), args.dtype)
    report = evaluate_icl(model, tok, task, test, pool, k=args.k, memory_demos=args.memory_demos, seeds=args.seeds,
                          seed=args.seed, memory_kwargs=checked(model, memory_args(args)), progress=args.progress, warn=warn)
    report["meta"] = {"data": str(args.data), "train": str(args.train), "model": str(args.model or "(shipped default)")}
    print(f"ICL {task.name}: {len(test)} test examples, k={args.k} local + {report['memory_demos']} in memory, "
          f"{args.seeds} seeds, chance {report['chance']:.3f}")
    print(f"{'mode':<12}{'greedy':>18}{'likelihood':>18}{'local demos':>13}")
    for mode in MODES:
        r = report[mode]
        g, lk = r["accuracy_greedy"], r["accuracy_likelihood"]
        print(f"{mode:<12}{g['mean']:>11.3f} ± {g['std']:.3f}{lk['mean']:>11.3f} ± {lk['std']:.3f}{r['local_demos']:>13.1f}")
    if args.json:
        write_result(args.json, report)
    if args.plot:
        _plot_bars(args.plot, list(MODES),
                   {"greedy": [report[m]["accuracy_greedy"]["mean"] for m in MODES],
                    "likelihood": [report[m]["accuracy_likelihood"]["mean"] for m in MODES]},
                   {"greedy": [report[m]["accuracy_greedy"]["std"] for m in MODES],
                    "likelihood": [report[m]["accuracy_likelihood"]["std"] for m in MODES]},
                   "accuracy", f"In-context learning: {task.name}", hline=report["chance"])
    return 0


# --------------------------------------------------------------------------- passkey


def _run_passkey(args) -> int:
    from longmem.passkey import evaluate_passkey

    check_output(args.json)
    check_output(args.plot, "--plot")
    model, tok = load_model(args.model, resolve_device(args.device), args.dtype)
    report = evaluate_passkey(model, tok, args.distances, trials=args.trials, seed=args.seed,
                              memory_kwargs=checked(model, memory_args(args)), candidates=args.candidates,
                              max_new_tokens=args.max_new_tokens, progress=args.progress, warn=warn)
    report["meta"] = {"model": str(args.model or "(shipped default)")}
    print(f"pass key: {args.trials} trials per distance, local window {report['segment_length']}, "
          f"memory {report['memory_size']} tokens")
    print(f"accuracy greedy (exact digits) / choice (most likely of {args.candidates} keys)")
    print(f"{'distance':>10}" + "".join(f"{m:>20}" for m in MODES))
    for d in args.distances:
        print(f"{d:>10}" + "".join(f"{report[m]['by_distance'][str(d)]['accuracy_greedy']:>13.2f} / "
                                   f"{report[m]['by_distance'][str(d)]['accuracy_choice']:.2f}" for m in MODES))
    if args.json:
        write_result(args.json, report)
    if args.plot:
        xs = [str(d) for d in args.distances]
        lines = {}
        for m in MODES:
            lines[f"{m} greedy"] = [report[m]["by_distance"][x]["accuracy_greedy"] for x in xs]
            lines[f"{m} choice"] = [report[m]["by_distance"][x]["accuracy_choice"] for x in xs]
        _plot_lines(args.plot, xs, lines, "distance of the key (tokens)", "accuracy", "Pass-key retrieval",
                    hline=report["chance_choice"], dashed="choice")
    return 0


# --------------------------------------------------------------------------- names


def _run_names(args) -> int:
    from tqdm import tqdm

    from longmem.data import iter_documents
    from longmem.recall import COUNTS, identifier_recall

    if not 0 < args.memory_frac < 1:
        raise LongMemError(f"--memory-frac must be between 0 and 1 (the share of each document put in memory), got {args.memory_frac}")
    at_least_one(args, "context_chars", "min_chars", "new_tokens")
    check_output(args.json)
    check_output(args.plot, "--plot")
    docs = [d for path in args.data for d in iter_documents(path)]
    if not docs:
        raise LongMemError(f"no documents in {' '.join(args.data)}; give text files, folders or .jsonl files")
    model, tok = load_model(args.model, resolve_device(args.device), args.dtype)
    memory_kwargs = checked(model, memory_args(args))
    per_doc = {}
    for doc in tqdm(docs, desc="eval names", unit="doc", disable=not args.progress):
        per_doc[doc.id] = identifier_recall(model, tok, doc.text, args.memory_frac, args.context_chars, args.min_chars,
                                            args.new_tokens, memory_kwargs)
    total = {k: sum(r[k] for r in per_doc.values()) for k in COUNTS}
    report = {"all": total, "documents": per_doc,
              "meta": {"model": str(args.model or "(shipped default)"), "memory_frac": args.memory_frac,
                       "context_chars": args.context_chars, "min_chars": args.min_chars, "new_tokens": args.new_tokens}}
    print(f"names defined in the first {args.memory_frac:.0%} of each document (in memory), completed at their first use "
          f"after it from their first token (greedy, {args.context_chars} characters of prompt)")
    print(f"{'document':<44}{'names':>7}{'with memory':>13}{'without':>9}{'only with':>11}{'only without':>14}")
    for name, r in [*per_doc.items(), ("all", total)]:
        print(f"{name[-44:]:<44}{r['probes']:>7}{r['right_memory']:>13}{r['right_no_memory']:>9}"
              f"{r['only_with_memory']:>11}{r['only_without_memory']:>14}")
    if args.json:
        write_result(args.json, report)
    if args.plot:
        groups = [k for k, r in per_doc.items() if r["probes"]] + ["all"]
        rows = [per_doc[k] for k in groups[:-1]] + [total]
        series = {label: [r[key] / max(1, r["probes"]) for r in rows]
                  for label, key in (("with memory", "right_memory"), ("without memory", "right_no_memory"))}
        labels = [f"{Path(g).name[-18:]} ({r['probes']})" for g, r in zip(groups, rows)]
        _plot_bars(args.plot, labels, series, None, "share of names completed exactly (names probed)",
                   "Names defined far back, completed from memory")
    return 0


# --------------------------------------------------------------------------- parser


def _model_flags(p, several: bool = False) -> None:
    if several:
        p.add_argument("--model", action="extend", nargs="+", metavar="DIR",
                       help="LongMem checkpoint folder(s) to compare; repeat or list several "
                            "(default: the shipped models/longmem-tiny)")
    else:
        p.add_argument("--model", metavar="DIR", help="LongMem checkpoint folder (default: the shipped models/longmem-tiny)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights' type after loading (default: as stored; "
                                                                    "bf16 halves the memory of a real backbone)")


def _memory_flags(p, chunk_default: str = "the model's") -> None:
    p.add_argument("--memory-size", type=int, metavar="M", help="memory tokens per row at evaluation (default: the model's)")
    p.add_argument("--chunk-size", type=int, metavar="CSZ", help=f"tokens per memory chunk (default: {chunk_default})")
    p.add_argument("--topk-chunks", type=int, metavar="KC", help="chunks retrieved per query and head (default: the model's)")


def _output_flags(p, plot: str) -> None:
    p.add_argument("--json", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--plot", metavar="OUT.png", help=f"also draw {plot}")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a LongMem checkpoint (perplexity, ChapterBreak, ICL, pass key, names)",
                       description="The paper's evaluations. Each compares three modes of one checkpoint on the same "
                                   "tokens: longmem (SideNet reading its memory), no_memory (same weights, memory off) "
                                   "and backbone (the frozen LM alone).")
    ev = p.add_subparsers(dest="eval_command", metavar="TASK")
    ev.required = True

    q = ev.add_parser("ppl", help="long-context perplexity with and without memory",
                      description="Stream each document in local windows of the model's segment length, memory reset per "
                                  "document, and report token perplexity overall, beyond the first window, by position "
                                  "(0-1, 1-4, 4-16, 16+ windows) and by document length (<5K, 5K-10K, 10K-100K, "
                                  "100K-500K, 500K-1M, >1M tokens; empty splits omitted). Documents not longer than one "
                                  "window are skipped with a warning.",
                      epilog="--json layout: {\"longmem\": S, \"no_memory\": S, \"backbone\": S, \"baseline:NAME\": S, "
                             "\"meta\": {...}} for one model; with several --model the keys are \"<model name>/<mode>\" "
                             "(model name = the checkpoint folder's name). S holds ppl, ppl_beyond_window, loss, tokens, "
                             "tokens_beyond_window, ppl_by_position, tokens_by_position and by_length.")
    q.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="documents: text files, folders, .jsonl files ({\"text\": ...} per line) or hf:NAME[:SPLIT]")
    _model_flags(q, several=True)
    q.add_argument("--baseline", action="append", metavar="DIR",
                   help="a plain HF causal LM folder (with the same tokenizer) scored on the same windows; repeatable")
    q.add_argument("--max-tokens", type=int, metavar="N", help="read at most the first N tokens of each document (default: all)")
    q.add_argument("--batch-size", type=int, default=1, metavar="B", help="documents streamed side by side (default: 1)")
    _memory_flags(q)
    _output_flags(q, "perplexity by position bucket, one line per model and mode")
    q.set_defaults(func=_run_ppl)

    c = ev.add_parser("chapterbreak", help="ChapterBreak: pick the true next-chapter beginning among six",
                      description="Read each prefix into memory segment by segment (its last local window stays as "
                                  "context), score the candidate beginnings by their log-probability after it (summed and "
                                  "per-token mean; candidates are never written to memory) and report the accuracy of "
                                  "picking the true one, against chance (1/number of candidates).")
    c.add_argument("--data", required=True, metavar="FILE.json",
                   help='ChapterBreak JSON: {"pg19": {work: [{"ctx", "pos", "negs"}]}, "ao3": {...}}')
    c.add_argument("--split", default="all", metavar="SPLIT", help="ao3, pg19 or all (default: all)")
    c.add_argument("--max-examples", type=int, metavar="N", help="evaluate only the first N examples")
    c.add_argument("--max-candidate-tokens", type=int, metavar="C",
                   help="cut candidates to C tokens (default: half the local window)")
    c.add_argument("--max-context-tokens", type=int, metavar="N", help="keep only the last N prefix tokens (default: all)")
    _model_flags(c)
    _memory_flags(c)
    _output_flags(c, "a bar chart of accuracy by mode")
    c.set_defaults(func=_run_chapterbreak)

    b = ev.add_parser("chapterbreak-build", help="write ChapterBreak-format examples from a book with chapter headings",
                      description="For each chapter boundary with enough later chapters: ctx = the book before the heading "
                                  "(last --context-chars characters), pos = the first --candidate-words words of the next "
                                  "chapter, negs = the beginnings of --negatives chapters drawn from later in the book. "
                                  "Headings ('CHAPTER I', 'Chapter 1', ...) and volume lines are left out of candidates. "
                                  "Deterministic for a --seed.")
    b.add_argument("--book", required=True, metavar="SRC",
                   help="austen:TITLE (from DATA_ROOT/books/*.jsonl, e.g. austen:Emma), a .jsonl (with --id) or a text file")
    b.add_argument("--out", required=True, metavar="FILE.json", help="where to write the examples")
    b.add_argument("--id", help="document id inside a .jsonl --book")
    b.add_argument("--data-root", default="data", metavar="DIR", help="folder written by `longmem data` (default: data)")
    b.add_argument("--split", default="pg19", metavar="SPLIT",
                   help="split to file the examples under: pg19 or ao3 (default: pg19)")
    b.add_argument("--negatives", type=int, default=5, metavar="N", help="negative candidates per example (default: 5)")
    b.add_argument("--context-chars", type=int, default=40000, metavar="N", help="characters of prefix kept (default: 40000)")
    b.add_argument("--candidate-words", type=int, default=150, metavar="K", help="words per candidate beginning (default: 150)")
    b.add_argument("--max-examples", type=int, metavar="N", help="keep only the first N examples")
    b.add_argument("--seed", type=int, default=0, metavar="S", help="seed for drawing the negatives (default: 0)")
    b.set_defaults(func=_run_build)

    i = ev.add_parser("icl", help="memory-augmented in-context learning (SST-2, MR, Subj, SST-5, MPQA)",
                      description="The paper's protocol: k demonstrations in the local window and N more written into "
                                  "memory (chunk size 2), templates 'Review: {x} Sentiment: {y}. ' (Subj: 'Input: {x} "
                                  "Type: {y}. '), label words positive/negative (sst2, mr, mpqa; 1 = positive), "
                                  "terrible/bad/okay/good/great (sst5), subjective/objective (subj; 0 = subjective). "
                                  "Test prompts are never written to memory. Accuracy by the greedy-prefix rule and by "
                                  "label-word likelihood, mean and std over seeds.")
    i.add_argument("--task", required=True, metavar="TASK", help="sst2, mr, subj, sst5 or mpqa")
    i.add_argument("--data", required=True, metavar="TEST",
                   help="test examples: .tsv (sentence<TAB>label, with header), .csv (label,text), "
                        ".jsonl ({text, label}) or hf:NAME[:SPLIT]")
    i.add_argument("--train", required=True, metavar="POOL", help="demonstration pool, same formats as --data")
    i.add_argument("--k", type=int, default=20, help="demonstrations in the local context (default: 20)")
    i.add_argument("--memory-demos", type=int, default=2000, metavar="N",
                   help="demonstrations written into memory (default: 2000; a smaller pool is used whole, with a warning)")
    i.add_argument("--seeds", type=int, default=6, metavar="N", help="number of seeds, i.e. demonstration samples (default: 6)")
    i.add_argument("--seed", type=int, default=1, metavar="S", help="first seed; seeds S..S+N-1 (default: 1, as the release)")
    i.add_argument("--max-test", type=int, metavar="N", help="evaluate only the first N test examples")
    _model_flags(i)
    _memory_flags(i, chunk_default="2")
    i.epilog = "--memory-size defaults to the model's, enlarged to hold all memory demonstrations."
    _output_flags(i, "a bar chart of accuracy by mode and rule")
    i.set_defaults(func=_run_icl)

    k = ev.add_parser("passkey", help="pass-key retrieval: recall a 5-digit key from beyond the local window",
                      description="Hide a 5-digit key early in filler text ('The grass is green. ...') and ask for it at "
                                  "the end ('What is the pass key? The pass key is'). Accuracy by distance: greedy (the "
                                  "generated digits equal the key exactly) and choice (the key is the most likely of "
                                  "--candidates 5-digit numbers).")
    k.add_argument("--distances", type=int, nargs="+", default=[1000, 4000, 16000], metavar="D",
                   help="tokens between the key and the question (default: 1000 4000 16000)")
    k.add_argument("--trials", type=int, default=10, metavar="N", help="keys tried per distance (default: 10)")
    k.add_argument("--candidates", type=int, default=10, metavar="N",
                   help="keys compared by the choice rule, the true one included (default: 10)")
    k.add_argument("--max-new-tokens", type=int, default=8, metavar="N",
                   help="tokens generated for the greedy answer (default: 8)")
    k.add_argument("--seed", type=int, default=0, metavar="S", help="seed for keys and lead-ins (default: 0)")
    _model_flags(k)
    _memory_flags(k)
    _output_flags(k, "accuracy by distance, one line per mode and rule")
    k.set_defaults(func=_run_passkey)

    n = ev.add_parser("names", help="recall of names defined far back in code: completed with and without memory",
                      description="For each document: its first --memory-frac (cut at a line start) goes into a fresh "
                                  "memory; every name that part defines (def NAME, class NAME, NAME =, self.NAME =) and the "
                                  "rest uses is cued at its first use there, with the --context-chars characters before "
                                  "it (which must not contain it) and the name's first token; greedy generation with the "
                                  "memory and without. A name counts when the rest of it comes back exactly. Nothing is "
                                  "picked by hand (longmem.recall).",
                      epilog="--json layout: {\"all\": C, \"documents\": {ID: C + memory_tokens, context_chars, rows}, "
                             "\"meta\": {...}}; C holds probes, right_memory, right_no_memory, only_with_memory, "
                             "only_without_memory; each row the name, its cue and both continuations.")
    n.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="code documents: text files, folders, .jsonl files ({\"text\": ...} per line) or hf:NAME[:SPLIT]")
    n.add_argument("--memory-frac", type=float, default=0.5, metavar="F",
                   help="share of each document put in memory (default: 0.5)")
    n.add_argument("--context-chars", type=int, default=600, metavar="N", help="characters of prompt before each use (default: 600)")
    n.add_argument("--min-chars", type=int, default=6, metavar="N", help="shortest name probed (default: 6)")
    n.add_argument("--new-tokens", type=int, default=8, metavar="N", help="tokens generated per probe (default: 8)")
    _model_flags(n)
    _memory_flags(n)
    _output_flags(n, "a bar chart of names completed with and without memory, per document")
    n.set_defaults(func=_run_names)
