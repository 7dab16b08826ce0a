"""Can a backbone copy from its own context? (RESULTS.md, "Retrieval diagnostics")

Recall from memory needs a backbone that can copy at all: at a repeated token it must find where that token was seen
and read what followed (an induction head). This measures it without any memory: for random held-out passages of
--passage tokens, the window holds the passage, --gap other tokens, then the passage again; reported is the mean
next-token loss on the first and on the second occurrence. A model that copies predicts the repeat almost perfectly
(loss well under 1 nat); one that does not barely improves on it.

    .venv/bin/python scripts/copy_in_context.py --model models/longmem-tiny/backbone
"""
import argparse
import json
import random
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", nargs="+", default=["models/longmem-tiny/backbone"], help="HF causal LM folders")
    p.add_argument("--data", nargs="+", default=["data/books/test.jsonl", "data/code/test.jsonl"])
    p.add_argument("--passages", type=int, default=4, help="passages per document")
    p.add_argument("--passage", type=int, default=64)
    p.add_argument("--gap", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from transformers import AutoModelForCausalLM

    from longmem.loading import load_tokenizer

    results = {}
    for folder in a.model:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        tok = load_tokenizer(folder)
        rng = random.Random(a.seed)
        first, second = [], []
        for path in a.data:
            for line in open(path):
                ids = tok.backend_tokenizer.encode(json.loads(line)["text"][:200000], add_special_tokens=False).ids
                for _ in range(a.passages):
                    s = rng.randrange(0, len(ids) - 2 * a.passage - a.gap - 200)
                    lead, passage = ids[s:s + 100], ids[s + 100:s + 100 + a.passage]
                    gap = ids[s + 200 + a.passage:s + 200 + a.passage + a.gap]
                    x = torch.tensor([lead + passage + gap + passage])
                    with torch.no_grad():
                        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
                    nll = -logp.gather(1, x[0, 1:, None])[:, 0]  # nll[i]: loss of token i + 1
                    at = 100 + a.passage + a.gap  # where the repeat starts
                    first.append(nll[100:100 + a.passage - 1].mean().item())
                    second.append(nll[at:at + a.passage - 1].mean().item())
        results[folder] = {"passages": len(first), "loss_first": round(sum(first) / len(first), 4),
                           "loss_repeat": round(sum(second) / len(second), 4)}
        print(json.dumps({folder: results[folder]}))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
