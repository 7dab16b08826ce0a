"""The README's recall example, and how much it depends on where the prompt starts.

Memory: the first half of this Python's ``xml/etree/ElementTree.py`` (held out from all training; cut at a line
start, as ``longmem eval names`` cuts), written as ``longmem memory add`` writes it. Prompt: the lines
before the first ``_raise_serialization_error(`` call after ``def _escape_cdata_c14n``, then the call's indent and
``_``; the name is defined and used only in the first half, never in a prompt. Greedy generation with that memory
and without, from every third line between --span lines and 3 lines before the call (and from the README's start,
``def pi``). Reported per start: the continuations, whether each completes the name exactly or starts its first
12 characters (``raise_serial``).

    .venv/bin/python scripts/etree_example.py --json results/v3/etree_example.json
"""
import argparse
import copy
import json
import sys
import xml.etree.ElementTree
from pathlib import Path

import torch

from longmem.loading import TINY_MODEL, load_model_and_tokenizer
from longmem.store import ingest_file
from longmem.tokens import token_ids

NAME = "_raise_serialization_error"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="LongMem folder (default: the shipped models/longmem-tiny)")
    p.add_argument("--span", type=int, default=51, help="earliest start, in lines before the call")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    text = Path(xml.etree.ElementTree.__file__).read_text()
    lines = text.splitlines(keepends=True)
    cut = text.rfind("\n", 0, len(text) // 2) + 1
    head = text[:cut].count("\n")
    fn = next(i for i, line in enumerate(lines) if line.startswith("def _escape_cdata_c14n"))
    call = next(i for i in range(fn, len(lines)) if lines[i].lstrip().startswith(NAME + "("))
    indent = lines[call][: len(lines[call]) - len(lines[call].lstrip())]
    readme = max(i for i in range(call) if lines[i].lstrip().startswith("def pi("))
    assert NAME in text[:cut] and NAME not in "".join(lines[call - a.span:call]), "the name must be only in memory"

    model, tok = load_model_and_tokenizer(a.model or TINY_MODEL)
    model.eval()
    tmp = Path("/tmp/longmem-etree-first-half.py")
    tmp.write_text(text[:cut])
    mem = model.new_memory(1)
    ingest_file(model, tok, mem, tmp)
    rows = []
    for start in [readme] + list(range(call - a.span, call - 2, 3)):
        prompt = "".join(lines[start:call]) + indent + "_"
        ids = torch.tensor([token_ids(tok, prompt)])
        row = {"start_line": start + 1, "prompt_tokens": ids.shape[1]}
        for k, m in (("memory", mem), ("no_memory", None)):
            out = model.generate(ids, memory=None if m is None else copy.deepcopy(m), max_new_tokens=a.new_tokens)
            got = "_" + tok.decode(out[0, ids.shape[1]:].tolist())
            row[k] = got
            row[f"exact_{k}"] = got.startswith(NAME + "(")
            row[f"prefix_{k}"] = got.startswith(NAME[:13])
        rows.append(row)
        print(f"line {start + 1}: memory {row['memory']!r:36} no memory {row['no_memory']!r}", file=sys.stderr)
    sweep = rows[1:]
    summary = {"model": a.model or "models/longmem-tiny", "file": xml.etree.ElementTree.__file__,
               "memory_lines": head, "memory_tokens": mem.num_tokens(0), "call_line": call + 1,
               "readme_start_line": readme + 1, "readme": rows[0], "starts": len(sweep),
               **{f"{w}_{k}": sum(r[f"{w}_{k}"] for r in sweep) for w in ("exact", "prefix") for k in ("memory", "no_memory")}}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({**summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
