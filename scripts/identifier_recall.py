"""Identifiers defined far back (README, RESULTS.md): can the model complete a name that only its memory holds?

For each held-out code document, `longmem.recall.identifier_recall`: the first --memory-frac in a fresh memory,
every identifier it defines probed at its first use in the rest, --context-chars characters before that use
(without the name) plus the name's first token as the prompt, greedy with the memory and without. Nothing is
picked by hand. Per-document counts are summed.

    .venv/bin/python scripts/identifier_recall.py                 # the shipped default, the code test split
    .venv/bin/python scripts/identifier_recall.py --model runs/memcopy-books --json results/v3/identifiers.json
"""
import argparse
import json
import sys
from pathlib import Path

from longmem.demo import load_model_and_tokenizer
from longmem.recall import identifier_recall

COUNTS = ("probes", "right_memory", "right_no_memory", "only_with_memory", "only_without_memory")


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
    rows, summary = [], dict.fromkeys(COUNTS, 0)
    for path in a.data:
        for d, line in enumerate(open(path)):
            r = identifier_recall(model, tok, json.loads(line)["text"], a.memory_frac, a.context_chars, a.min_chars,
                                  a.new_tokens)
            for k in COUNTS:
                summary[k] += r[k]
            rows += [{"source": f"{path}#{d}", "memory_tokens": r["memory_tokens"], **row} for row in r["rows"]]
            for row in r["rows"]:
                print(f"{row['name']:>28} | mem {row['memory']!r:34} | none {row['no_memory']!r}", file=sys.stderr)
    summary = {"model": a.model or "models/longmem-tiny", "data": a.data, "memory_frac": a.memory_frac,
               "context_chars": a.context_chars, **summary}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({**summary, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
