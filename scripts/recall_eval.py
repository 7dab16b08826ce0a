"""Recall from memory (README, RESULTS.md): can the model continue a passage whose continuation is only in its memory?

For each held-out document: the whole document goes into a fresh memory exactly as `longmem memory add` writes it;
then --prompts passages are drawn at random (seeded) from it; each prompt is --prompt-tokens tokens of the document
and the truth is the --new-tokens tokens that follow it there. Greedy generation runs with that memory and without
any memory (the same model, the same prompt). Reported: how often the first 4 / all generated tokens equal the truth,
and the mean length of the matching prefix. Nothing is picked by hand.

    .venv/bin/python scripts/recall_eval.py                        # the shipped default, books + code test splits
    .venv/bin/python scripts/recall_eval.py --model runs/recall-tiny --json results/recall.json
"""
import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

from longmem.loading import TINY_MODEL, load_model_and_tokenizer
from longmem.store import ingest_file
from longmem.tokens import token_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="LongMem folder (default: the shipped models/longmem-tiny)")
    p.add_argument("--data", nargs="+", default=["data/books/test.jsonl", "data/code/test.jsonl"])
    p.add_argument("--max-chars", type=int, default=60000, help="characters of each document put in memory")
    p.add_argument("--prompts", type=int, default=8, help="prompts per document")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, tok = load_model_and_tokenizer(a.model or TINY_MODEL)
    model.eval()
    rng = random.Random(a.seed)
    rows = []
    tmp = Path("/tmp/longmem-recall-doc.txt")
    for path in a.data:
        for line in open(path):
            text = json.loads(line)["text"][: a.max_chars]
            ids = token_ids(tok, text)
            tmp.write_text(text)
            mem = model.new_memory(1)
            ingest_file(model, tok, mem, tmp)
            for _ in range(a.prompts):
                s = rng.randrange(0, len(ids) - a.prompt_tokens - a.new_tokens)
                prompt = torch.tensor([ids[s:s + a.prompt_tokens]])
                truth = ids[s + a.prompt_tokens:s + a.prompt_tokens + a.new_tokens]
                out = {}
                for name, memory in (("memory", mem), ("no_memory", None)):
                    # generate() writes slid-out tokens into the memory it is given: use a copy so prompts stay independent
                    m = None if memory is None else _copy(model, memory)
                    got = model.generate(prompt, memory=m, max_new_tokens=a.new_tokens)[0, a.prompt_tokens:].tolist()
                    out[name] = got
                rows.append({"source": path, "prompt": tok.decode(prompt[0].tolist()), "truth": tok.decode(truth),
                             **{k: tok.decode(v) for k, v in out.items()},
                             **{f"prefix_{k}": _prefix(v, truth) for k, v in out.items()}})
            print(f"{path}: {len(rows)} prompts so far", file=sys.stderr)
    n = len(rows)
    summary = {"model": a.model or "models/longmem-tiny", "prompts": n, "prompt_tokens": a.prompt_tokens,
               "new_tokens": a.new_tokens}
    for k in ("memory", "no_memory"):
        pre = np.array([r[f"prefix_{k}"] for r in rows])
        summary[k] = {"first4_exact": float((pre >= 4).mean()), "all_exact": float((pre >= a.new_tokens).mean()),
                      "mean_prefix": float(pre.mean())}
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps({**summary, "rows": rows}, indent=1) + "\n")


def _prefix(got, truth) -> int:
    return next((i for i, (x, y) in enumerate(zip(got, truth)) if x != y), min(len(got), len(truth)))


def _copy(model, memory):
    import copy

    return copy.deepcopy(memory)


if __name__ == "__main__":
    main()
