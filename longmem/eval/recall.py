"""Recall from memory on real code: can the model complete a name that only its memory holds?

A document is split at a line start: its first part goes into a fresh memory (as ``longmem memory add``
writes it), and every identifier that part defines (``def NAME``, ``class NAME``, ``NAME =``,
``self.NAME =``; at least ``min_chars`` characters, not a keyword or builtin, not a dunder) and the rest of
the document uses is probed once, at its first use that is at least ``context_chars`` into the rest and
whose ``context_chars`` characters before it do not contain the name. The prompt is those characters plus
the name's first token; greedy generation runs with the memory and without any memory (same model, same
prompt). A probe is right when the generation completes the name exactly: the rest of it, then a character
that cannot continue a name. Nothing is picked by hand.
"""

from __future__ import annotations

import builtins
import copy
import keyword
import re

import torch
from tqdm import tqdm

from longmem.tokens import token_ids, token_ids_and_offsets

DEFINES = re.compile(r"^[ \t]*(?:def|class)[ \t]+([A-Za-z_]\w*)|^[ \t]*(?:self\.)?([A-Za-z_]\w*)[ \t]*=[^=]", re.M)
COMMON = set(keyword.kwlist) | set(dir(builtins)) | {"self", "cls"}


def defined_names(text: str, min_chars: int = 6) -> list[str]:
    """Names ``text`` defines, in order of first definition."""
    names = []
    for m in DEFINES.finditer(text):
        n = m.group(1) or m.group(2)
        if len(n) >= min_chars and n not in COMMON and not n.startswith("__") and n not in names:
            names.append(n)
    return names


def probe_sites(text: str, cut: int, names: list[str], context_chars: int) -> list[tuple[str, int]]:
    """[(name, offset of its first use at least context_chars after cut, the name absent from the context)]."""
    out = []
    for n in names:
        for m in re.finditer(r"(?<!\w)%s(?!\w)" % re.escape(n), text[cut + context_chars:]):
            pos = cut + context_chars + m.start()
            if n not in text[pos - context_chars:pos]:
                out.append((n, pos))
                break
    return sorted(out, key=lambda x: x[1])


COUNTS = ("probes", "right_memory", "right_no_memory", "only_with_memory", "only_without_memory")


@torch.no_grad()
def identifier_recall(model, tokenizer, text: str, memory_frac: float = 0.5, context_chars: int = 600,
                      min_chars: int = 6, new_tokens: int = 8, memory_kwargs: dict | None = None) -> dict:
    """Probe every identifier of ``text``'s first part (see the module docstring).

    Returns the ``COUNTS``, ``memory_tokens``, ``context_chars`` and one row per probe (name, cue, both
    continuations). ``memory_kwargs``: ``new_memory`` arguments (default: the model's memory settings).
    """
    cut = text.rfind("\n", 0, int(len(text) * memory_frac)) + 1
    memory = model.new_memory(1, **(memory_kwargs or {}))
    model.write_memory(torch.as_tensor(token_ids(tokenizer, text[:cut]), dtype=torch.long).view(1, -1), memory)
    rows = []
    for name, pos in probe_sites(text, cut, defined_names(text[:cut], min_chars), context_chars):
        start = pos - context_chars
        _, offsets = token_ids_and_offsets(tokenizer, text[start:pos + len(name)])
        cue_end = start + next(t for s, t in offsets if t > context_chars)  # end of the name's first token
        if cue_end >= pos + len(name):  # a one-token name: nothing to complete
            continue
        rest = text[cue_end:pos + len(name)]
        ids = torch.tensor([token_ids(tokenizer, text[start:cue_end])], device=model.device)
        row = {"name": name, "defined_at": text.find(name), "used_at": pos, "cue": text[pos:cue_end],
               "prompt_tail": text[max(start, cue_end - 80):cue_end]}
        for key, mem in (("memory", memory), ("no_memory", None)):
            # generate() writes slid-out tokens into the memory it is given: a copy keeps probes independent
            out = model.generate(ids, memory=None if mem is None else copy.deepcopy(mem), max_new_tokens=new_tokens)
            got = tokenizer.decode(out[0, ids.shape[1]:].tolist())
            row[key] = got
            row[f"right_{key}"] = got.startswith(rest) and not re.match(r"\w", got[len(rest):len(rest) + 1])
        rows.append(row)
    return {"probes": len(rows), "memory_tokens": memory.num_tokens(0), "context_chars": context_chars,
            "right_memory": sum(r["right_memory"] for r in rows), "right_no_memory": sum(r["right_no_memory"] for r in rows),
            "only_with_memory": sum(r["right_memory"] and not r["right_no_memory"] for r in rows),
            "only_without_memory": sum(r["right_no_memory"] and not r["right_memory"] for r in rows), "rows": rows}


def names_report(model, tokenizer, docs, *, memory_frac: float = 0.5, context_chars: int = 600, min_chars: int = 6,
                 new_tokens: int = 8, memory_kwargs: dict | None = None, progress: bool = False) -> dict:
    """``identifier_recall`` on every document: ``{"all": COUNTS summed, "documents": {id: result}, "meta": {...}}``."""
    per_doc = {}
    for doc in tqdm(docs, desc="eval names", unit="doc", disable=not progress):
        per_doc[doc.id] = identifier_recall(model, tokenizer, doc.text, memory_frac, context_chars, min_chars, new_tokens,
                                            memory_kwargs)
    total = {k: sum(r[k] for r in per_doc.values()) for k in COUNTS}
    return {"all": total, "documents": per_doc,
            "meta": {"memory_frac": memory_frac, "context_chars": context_chars, "min_chars": min_chars,
                     "new_tokens": new_tokens}}
