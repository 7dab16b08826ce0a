"""Write ``code_names``, an lm-evaluation-harness multiple-choice task over the held-out code (test split).

Each example is a point in a held-out Python file where a name defined in the file's first half is used,
far from its definition: the context is the file up to that point, the choices are the name and three other
names the file's first half defines (drawn with a fixed seed), and the model picks the most likely. The
probes are those of ``longmem eval names`` (``longmem.eval.recall``: first use at least ``--context-chars``
characters into the second half, the name absent from those characters), kept only where the name is also
absent from the local window the harness gives the model (the context's last ``T - longest choice`` tokens).
So the answer is in the file, but only the memory can hold it. Chance is 25%.

    longmem data code                                   # data/code/{train,validation,test}.jsonl
    python scripts/harness_code_names.py                # data/harness/code_names.{yaml,jsonl}
    longmem eval harness --tasks code_names --include-path data/harness --output results/harness_code_names.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np

from longmem.eval.recall import defined_names, probe_sites
from longmem.loading import TINY_MODEL, load_model_and_tokenizer
from longmem.tokens import encode

YAML = """task: code_names
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1
"""


def build(docs: list[dict], tokenizer, window: int, context_chars: int = 1200, per_doc: int = 25, seed: int = 0) -> list[dict]:
    out = []
    for doc in docs:
        text = doc["text"]
        cut = text.rfind("\n", 0, len(text) // 2) + 1
        names = defined_names(text[:cut])
        if len(names) < 4:
            continue
        kept = []
        for name, pos in probe_sites(text, cut, names, context_chars):
            choices = [name] + random.Random(f"{seed}/{doc['id']}/{name}").sample([n for n in names if n != name], 3)
            longest = max(len(encode(tokenizer, c)) for c in choices)
            local = encode(tokenizer, text[max(0, pos - 8 * window):pos])[-(window - longest):]
            if name in tokenizer.decode(local.tolist()):
                continue  # the local window would show it
            order = random.Random(f"{seed}/{doc['id']}/{name}/order").sample(range(4), 4)
            kept.append({"doc": doc["id"], "name": name, "context": text[:pos], "choices": [choices[i] for i in order],
                         "label": order.index(0)})
        step = max(1, len(kept) / per_doc)
        out += [kept[int(i * step)] for i in range(min(per_doc, len(kept)))]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/code/test.jsonl", help="held-out code documents (default: data/code/test.jsonl)")
    p.add_argument("--out", default="data/harness", help="folder for code_names.yaml and code_names.jsonl")
    p.add_argument("--model", default=str(TINY_MODEL), help="the model whose window and tokenizer decide the probes")
    p.add_argument("--per-doc", type=int, default=25, help="examples per document at most (default: 25)")
    args = p.parse_args()
    docs = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    model, tok = load_model_and_tokenizer(args.model)
    examples = build(docs, tok, model.segment_length, per_doc=args.per_doc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "code_names.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    (out / "code_names.yaml").write_text(YAML.format(data=(out / "code_names.jsonl").resolve()), encoding="utf-8")
    lengths = [len(encode(tok, e["context"])) for e in examples]
    print(f"{len(examples)} examples from {len({e['doc'] for e in examples})} documents -> {out}/code_names.yaml; "
          f"context tokens median {int(np.median(lengths))}, max {max(lengths)} (window {model.segment_length})")


if __name__ == "__main__":
    main()
