"""Can a backbone copy from its own context? (RESULTS.md, "Retrieval diagnostics")

A command-line front to ``longmem.eval.induction.copy_in_context`` (its docstring says what is measured).

    .venv/bin/python scripts/copy_in_context.py --model longmem/models/longmem-tiny/backbone
"""
import argparse
import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from longmem.eval.induction import copy_in_context
from longmem.loading import TINY_MODEL, load_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=[str(TINY_MODEL / "backbone")], help="HF causal LM folders")
    p.add_argument("--data", nargs="+", default=["data/books/test.jsonl", "data/code/test.jsonl"])
    p.add_argument("--passages", type=int, default=4, help="passages per document")
    p.add_argument("--passage", type=int, default=64)
    p.add_argument("--gap", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    texts = [json.loads(line)["text"] for path in a.data for line in open(path)]
    results = {}
    for folder in a.model:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        results[folder] = copy_in_context(model, load_tokenizer(folder), texts, a.passages, a.passage, a.gap, a.seed)
        print(json.dumps({folder: results[folder]}))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
