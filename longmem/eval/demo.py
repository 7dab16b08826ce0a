"""``longmem demo``: the shipped default on a held-out long document, with and without its memory.

Streams the document in local windows of T tokens (memory reset at its start), reports perplexity
in the three modes of ``longmem.eval.scoring`` on the same tokens, then shows the token where the
memory helped most among those that the local window could not have supplied: the token appears
earlier in the document, but only further back than T tokens. Then a recall question: a pass key
planted near the document's start, asked for after its end, answered with the document in memory
and without it (same weights). ``names=True`` adds the identifier probe (``eval.recall``).
"""

from __future__ import annotations

import math
import time

import numpy as np

from longmem.data.corpora import code_splits
from longmem.data.streams import encode_documents
from longmem.errors import LongMemError
from longmem.eval.passkey import answer_digits, read_and_answer
from longmem.eval.recall import identifier_recall
from longmem.eval.scoring import fill_memory, split_context
from longmem.io import check_output, write_result
from longmem.loading import load_model_and_tokenizer
from longmem.stream_loss import stream_nll
from longmem.tokens import encode


def default_document() -> tuple[str, str]:
    """The longest test-split file of the code corpus (this interpreter's standard library)."""
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


RECALL_KEY = "71432"
RECALL_FACT = f"\n# The pass key is {RECALL_KEY}. Remember it. {RECALL_KEY} is the pass key.\n"
RECALL_QUESTION = " What is the pass key? The pass key is"


def recall_probe(model, tokenizer, ids: np.ndarray, new_tokens: int = 8) -> dict | None:
    """A pass key planted near the start of the document, asked for after its end: the document but its last window
    goes to a fresh memory; greedy answers with that memory and without it (same weights)."""
    enc = lambda text: encode(tokenizer, text)  # noqa: E731
    if len(enc(RECALL_QUESTION)) + new_tokens >= model.segment_length:
        return None  # a window too small to hold the question and its answer
    cut = min(200, len(ids) // 4)
    full = np.concatenate([ids[:cut], enc(RECALL_FACT), ids[cut:], enc(RECALL_QUESTION)])
    mem_ids, local = split_context(full, model.segment_length - new_tokens, model.config.chunk_size)
    memory = model.new_memory(1)
    fill_memory(model, memory, mem_ids)
    answers = {}
    for mode, mem in (("longmem", memory), ("no_memory", None)):
        out, _ = read_and_answer(model, local, [], new_tokens, mem)
        said = tokenizer.decode(out)
        answers[mode] = {"generated": said, "right": answer_digits(said) == RECALL_KEY}
    return {"key": RECALL_KEY, "distance": int(len(full) - cut), "memory_tokens": int(len(mem_ids)), **answers}


def run_demo(model_path=None, data=None, max_tokens: int = 4096, json_out=None, progress=True, names: bool = False) -> dict:
    t0 = time.time()
    if max_tokens < 2:
        raise LongMemError(f"--max-tokens must be at least 2, got {max_tokens}")
    if json_out:
        check_output(json_out)
    model, tokenizer = load_model_and_tokenizer(model_path)
    if data is None:
        name, text = default_document()
        ids = encode(tokenizer, text, dtype=np.int32)
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
    recall = recall_probe(model, tokenizer, ids)
    # generation: names the first half defines, completed in the second half with / without that half in memory
    identifiers = identifier_recall(model, tokenizer, tokenizer.decode(ids.tolist())) if names else None
    report = {**results, "document": name, "segment_length": T, "memory_size": model.config.memory_size,
              "example": example, "recall": recall, "identifiers": identifiers, "seconds": round(time.time() - t0, 1)}
    if json_out:
        write_result(json_out, report)  # with longmem_version, format_version and sha256 (see longmem.io)
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
    rc = r.get("recall")
    if rc:
        lines += ["", f"recall: a pass key ({rc['key']}) planted near the start, asked for after the end, "
                      f"{rc['distance']} tokens later; the document but its last window is in memory "
                      f"({rc['memory_tokens']} tokens)"]
        for mode, label in (("longmem", "with memory"), ("no_memory", "without memory")):
            lines.append(f"  {label:<15} {'right' if rc[mode]['right'] else 'wrong':<6} {rc[mode]['generated']!r}")
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
