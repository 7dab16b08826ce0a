"""``longmem demo``: the shipped default on a held-out long document, with and without its memory.

Streams the document in local windows of T tokens (memory reset at its start), reports perplexity
in the three modes of ``longmem.evaluate`` on the same tokens, then shows the token where the
memory helped most among those that the local window could not have supplied: the token appears
earlier in the document, but only further back than T tokens.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np

from longmem.errors import LongMemError

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "longmem-tiny"


def load_model_and_tokenizer(path: str | os.PathLike | None, dtype=None):
    """A LongMem checkpoint folder (default: the shipped longmem-tiny) and its backbone's tokenizer.
    ``dtype`` ("bf16", "fp32", ...): convert the model after loading."""
    from longmem.model import CONFIG_FILE, load_model, read_checkpoint_meta
    from longmem.pretrain import load_tokenizer

    path = Path(path or DEFAULT_MODEL)
    if not (path / CONFIG_FILE).is_file():
        if path == DEFAULT_MODEL:
            raise LongMemError(f"the shipped default model is missing from {path}; reinstall from a full clone of the repository")
        raise LongMemError(f"{path} is not a LongMem checkpoint (no {CONFIG_FILE}); train one with `longmem train`")
    meta = read_checkpoint_meta(path)
    model = load_model(path, dtype=dtype)
    ref = meta["backbone"]["path"]
    tok_dir = path / ref if (path / ref).is_dir() else Path(ref)
    return model, load_tokenizer(str(tok_dir))


def default_document() -> tuple[str, str]:
    """The longest test-split file of the code corpus (this interpreter's standard library)."""
    from longmem.data import code_splits

    test = code_splits()["test"]
    if not test:
        raise LongMemError("this Python's standard library has no test-split file; pass --data FILE")
    doc = max(test, key=lambda d: len(d.text))
    return f"stdlib:{doc.id}", doc.text


def memory_example(tokenizer, ids: np.ndarray, with_mem: dict, without: dict, T: int) -> dict | None:
    """The position where memory lowered the loss most, among tokens absent from the local window but
    present further back in the document."""
    last_seen: dict[int, int] = {}
    best = None
    for p in range(1, len(ids)):
        tok = int(ids[p])
        prev = last_seen.get(tok)
        last_seen[tok] = p
        if p < T or prev is None or p - prev <= T or (0, p) not in with_mem:
            continue
        gain = without[(0, p)] - with_mem[(0, p)]
        if best is None or gain > best[0]:
            best = (gain, p, prev)
    if best is None:
        return None
    gain, p, prev = best
    context = tokenizer.decode(ids[max(0, p - 40): p].tolist())
    return {
        "position": p,
        "token": tokenizer.decode([int(ids[p])]),
        "context": context[-160:],
        "earlier_at": prev,
        "distance": p - prev,
        "p_with_memory": math.exp(-with_mem[(0, p)]),
        "p_without_memory": math.exp(-without[(0, p)]),
    }


def run_demo(model_path=None, data=None, max_tokens: int = 16384, json_out=None, progress=True) -> dict:
    from longmem.eval_cli import check_output, write_result
    from longmem.evaluate import stream_nll
    from longmem.recall import identifier_recall
    from longmem.streams import encode_documents

    t0 = time.time()
    if max_tokens < 2:
        raise LongMemError(f"--max-tokens must be at least 2, got {max_tokens}")
    if json_out:
        check_output(json_out)
    model, tokenizer = load_model_and_tokenizer(model_path)
    if data is None:
        name, text = default_document()
        ids = np.asarray(tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)
    else:
        name = str(data)
        docs = encode_documents([data], tokenizer)
        ids = max(docs, key=len)
    ids = ids[:max_tokens]
    T = model.segment_length
    if len(ids) <= T + 1:
        raise LongMemError(f"{name} has {len(ids)} tokens, not more than one local window ({T}); memory cannot help — give a longer document")
    results, tables = {}, {}
    for mode in ("longmem", "no_memory", "backbone"):
        stats = stream_nll(model, [ids], mode, batch_size=1, progress=progress, desc=f"demo {mode}", keep_tokens=True)
        results[mode] = stats.summary()
        tables[mode] = stats.token_table()
    example = memory_example(tokenizer, ids, tables["longmem"], tables["no_memory"], T)
    # generation: names the first half defines, completed in the second half with / without that half in memory
    identifiers = identifier_recall(model, tokenizer, tokenizer.decode(ids.tolist()))
    report = {**results, "document": name, "segment_length": T, "memory_size": model.config.memory_size,
              "example": example, "identifiers": identifiers, "seconds": round(time.time() - t0, 1)}
    if json_out:
        write_result(json_out, report)  # with longmem_version, format_version and sha256 (see longmem.eval_cli)
    return report


def format_report(r: dict) -> str:
    lines = [f"LongMem demo: {r['document']} ({r['longmem']['tokens']} tokens, local window {r['segment_length']}, "
             f"memory up to {r['memory_size']} tokens)", "",
             f"{'mode':<12}{'ppl':>10}{'ppl beyond window':>20}{'tokens':>10}"]
    for mode in ("longmem", "no_memory", "backbone"):
        s = r[mode]
        beyond = f"{s['ppl_beyond_window']:.3f}" if s["ppl_beyond_window"] else "-"
        lines.append(f"{mode:<12}{s['ppl']:>10.3f}{beyond:>20}{s['tokens']:>10}")
    a, b = r["longmem"]["ppl_beyond_window"], r["no_memory"]["ppl_beyond_window"]
    if a and b:
        lines.append(f"\nbeyond the first window, memory changes perplexity by {100 * (a - b) / b:+.1f}% (same weights, memory off)")
    ex = r.get("example")
    if ex:
        lines += ["", f"where memory helped most: token {ex['token']!r} at position {ex['position']}; it last appeared "
                      f"{ex['distance']} tokens earlier, outside the {r['segment_length']}-token window",
                  f"  context: ...{ex['context']!r}",
                  f"  p(token) with memory {ex['p_with_memory']:.3f}, without {ex['p_without_memory']:.3f}"]
    lines += format_identifiers(r.get("identifiers"))
    lines.append(f"\n({r['seconds']} s)")
    return "\n".join(lines)


def format_identifiers(idr: dict | None) -> list[str]:
    if idr is None:
        return []
    head = "recall of names defined far back (generation):"
    if not idr["probes"]:
        return ["", f"{head} none to probe (no name defined in the first half is used in the second half)"]
    n = idr["probes"]
    lines = ["", f"{head} the first half ({idr['memory_tokens']} tokens) in a fresh memory; each name it defines, at its",
             f"first use in the second half, cued with the {idr['context_chars']} characters before it and the name's first token",
             f"  completed exactly: with memory {idr['right_memory']}/{n}, without {idr['right_no_memory']}/{n} "
             f"({idr['only_with_memory']} only with memory, {idr['only_without_memory']} only without)"]
    only = [x for x in idr["rows"] if x["right_memory"] and not x["right_no_memory"]]
    if only:  # the one with the most left to complete
        row = max(only, key=lambda x: len(x["name"]) - len(x["cue"]))
        cut = lambda t: (row["cue"] + t).split("\n")[0]  # noqa: E731
        lines += [f"  e.g. {row['name']}: ...{row['prompt_tail'][-60:]!r}",
                  f"    with memory {cut(row['memory'])!r}, without {cut(row['no_memory'])!r}"]
    return lines


def _run(args) -> int:
    report = run_demo(args.model, args.data, args.max_tokens, args.json, progress=not args.no_progress)
    print(format_report(report))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="show LongMem's memory at work on a held-out long document",
                       description="Stream a held-out long document through the shipped default model and print perplexity "
                                   "with memory, without memory (same weights) and with the frozen backbone alone; then "
                                   "put its first half in a memory and see whether the model completes names defined "
                                   "there when they are used in the second half (greedy, with and without memory).")
    p.add_argument("--model", help="LongMem checkpoint folder (default: the shipped models/longmem-tiny)")
    p.add_argument("--data", help="document to read (default: the longest test-split file of the stdlib code corpus)")
    p.add_argument("--max-tokens", type=int, default=16384, help="read at most this many tokens (default: 16384)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
