"""Identifiers defined far back (README, RESULTS.md): can the model complete a name that only its memory holds?

For each held-out code document: its first --memory-frac (cut at a line start) goes into a fresh memory exactly as
`longmem memory add` writes it. Every identifier that part defines (``def NAME``, ``class NAME``, ``NAME =``,
``self.NAME =``; at least --min-chars characters and two tokens) and that the rest of the document uses is a
probe, once, at its first use after the cut that is at least --context-chars into the rest: the prompt is the
--context-chars characters before that use (text the memory does not hold, and in which the name does not occur)
plus the name's first token. Greedy generation runs with that memory and without any memory (same model, same
prompt); a probe is right when the generation completes the name exactly (the rest of it, then a character that
cannot continue a name). Nothing is picked by hand.

    .venv/bin/python scripts/identifier_recall.py                 # the shipped default, the code test split
    .venv/bin/python scripts/identifier_recall.py --model runs/memcopy-books --json results/v2/identifiers.json
"""
import argparse
import copy
import json
import keyword
import re
import sys
import builtins
from pathlib import Path

import torch

from longmem.demo import load_model_and_tokenizer
from longmem.store import ingest_file

DEFINES = re.compile(r"^[ \t]*(?:def|class)[ \t]+([A-Za-z_]\w*)|^[ \t]*(?:self\.)?([A-Za-z_]\w*)[ \t]*=[^=]", re.M)
COMMON = set(keyword.kwlist) | set(dir(builtins)) | {"self", "cls"}


def defined_names(text: str, min_chars: int) -> list[str]:
    names = []
    for m in DEFINES.finditer(text):
        n = m.group(1) or m.group(2)
        if len(n) >= min_chars and n not in COMMON and not n.startswith("__") and n not in names:
            names.append(n)
    return names


def probes(text: str, cut: int, names: list[str], context_chars: int):
    """(name, offset of its first use at least context_chars after the cut, with the name absent from the context)."""
    out = []
    for n in names:
        for m in re.finditer(r"(?<![\w])%s(?!\w)" % re.escape(n), text[cut + context_chars:]):
            pos = cut + context_chars + m.start()
            if n not in text[pos - context_chars:pos]:
                out.append((n, pos))
                break
    return sorted(out, key=lambda x: x[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="LongMem folder (default: the shipped models/longmem-tiny)")
    p.add_argument("--data", nargs="+", default=["data/code/test.jsonl"], help="JSONL files with a 'text' field")
    p.add_argument("--memory-frac", type=float, default=0.5, help="share of each document put in memory")
    p.add_argument("--context-chars", type=int, default=600, help="characters of prompt before each use")
    p.add_argument("--min-chars", type=int, default=6, help="shortest identifier probed")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    model, tok = load_model_and_tokenizer(a.model)
    model.eval()
    enc = tok.backend_tokenizer
    rows = []
    tmp = Path("/tmp/longmem-identifier-doc.txt")
    for path in a.data:
        for d, line in enumerate(open(path)):
            text = json.loads(line)["text"]
            cut = text.rfind("\n", 0, int(len(text) * a.memory_frac)) + 1
            tmp.write_text(text[:cut])
            mem = model.new_memory(1)
            ingest_file(model, tok, mem, tmp)
            for name, pos in probes(text, cut, defined_names(text[:cut], a.min_chars), a.context_chars):
                start = pos - a.context_chars
                e = enc.encode(text[start:pos + len(name)], add_special_tokens=False)
                first = next(i for i, (s, t) in enumerate(e.offsets) if t > a.context_chars)
                cue_end = start + e.offsets[first][1]
                if cue_end >= pos + len(name):  # one token: nothing to complete
                    continue
                prompt = text[start:cue_end]
                rest = text[cue_end:pos + len(name)]
                ids = torch.tensor([enc.encode(prompt, add_special_tokens=False).ids])
                row = {"source": f"{path}#{d}", "name": name, "defined_at": text.find(name), "used_at": pos,
                       "memory_tokens": mem.num_tokens(0), "cue": text[pos:cue_end], "prompt_tail": prompt[-80:]}
                for k, m in (("memory", mem), ("no_memory", None)):
                    # generate() writes slid-out tokens into the memory it is given: a copy keeps probes independent
                    out = model.generate(ids, memory=None if m is None else copy.deepcopy(m), max_new_tokens=a.new_tokens)
                    got = tok.decode(out[0, ids.shape[1]:].tolist())
                    row[k] = got
                    row[f"right_{k}"] = got.startswith(rest) and not re.match(r"\w", got[len(rest):len(rest) + 1])
                rows.append(row)
                print(f"{name:>28} | mem {row['memory']!r:34} | none {row['no_memory']!r}", file=sys.stderr)
    n = len(rows)
    summary = {"model": a.model or "models/longmem-tiny", "data": a.data, "probes": n,
               "memory_frac": a.memory_frac, "context_chars": a.context_chars,
               "right_memory": sum(r["right_memory"] for r in rows), "right_no_memory": sum(r["right_no_memory"] for r in rows),
               "only_with_memory": sum(r["right_memory"] and not r["right_no_memory"] for r in rows),
               "only_without_memory": sum(r["right_no_memory"] and not r["right_memory"] for r in rows)}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({**summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
