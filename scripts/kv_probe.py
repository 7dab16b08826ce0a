"""What do the memory's keys and values encode? Linear probes on the backbone's block-m keys/values (RESULTS.md).

Copying from memory needs, at the stored token j + 1, a key that says which token came before it (so that the
current token can find it) and a value that says which token it is (so that it can be copied). This streams
held-out text through the frozen backbone up to block m, keeps the keys (all key/value heads, before rotary: what the
memory stores) and values, and fits a softmax-regression probe (8,192 classes, Adam, standardised features) from
each to the current / previous token; reported is the accuracy on the last 20% of the tokens (not trained on).

    .venv/bin/python scripts/kv_probe.py --json results/v2/kv_probe.json
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from longmem.loading import TINY_MODEL, load_model_and_tokenizer
from longmem.tokens import token_ids


def probe(features: torch.Tensor, target: torch.Tensor, classes: int, steps: int, seed: int) -> float:
    keep = target >= 0
    x, y = features[keep], target[keep]
    x = (x - x.mean(0)) / (x.std(0) + 1e-5)
    n_train = int(len(y) * 0.8)
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, n_train, (4096,), generator=g)
        loss = F.cross_entropy(x[idx] @ w + b, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[n_train:] @ w + b).argmax(-1) == y[n_train:]).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="LongMem folder (default: the shipped models/longmem-tiny)")
    p.add_argument("--data", default="data/pycode-unseen/half-b.jsonl")
    p.add_argument("--tokens", type=int, default=120000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    model, tok = load_model_and_tokenizer(a.model or TINY_MODEL)
    model.eval()
    m, T = model.memory_layer, model.segment_length
    keys, values, tokens, previous = [], [], [], []
    with open(a.data) as f:
        for line in f:
            ids = token_ids(tok, json.loads(line)["text"][:6000])
            for s in range(0, len(ids) - T, T):
                seg = torch.tensor([ids[s:s + T]])
                with torch.no_grad():
                    out = model.backbone(seg, memory_layer=m, upto=m)
                keys.append(out.keys[0].transpose(0, 1).reshape(T, -1).float())  # (T, Hkv * Dh)
                values.append(out.values[0].transpose(0, 1).reshape(T, -1).float())
                tokens.append(seg[0])
                previous.append(torch.cat([torch.tensor([-1]), seg[0, :-1]]))  # segments run alone: none before 0
            if sum(len(t) for t in tokens) >= a.tokens:
                break
    k, v, x, prev = torch.cat(keys), torch.cat(values), torch.cat(tokens), torch.cat(previous)
    V = model.backbone.model.config.vocab_size
    result = {"model": a.model or "models/longmem-tiny", "memory_layer": m, "tokens": len(x), "features": k.shape[1],
              "key_to_current_token": probe(k, x, V, a.steps, a.seed),
              "key_to_previous_token": probe(k, prev, V, a.steps, a.seed),
              "value_to_current_token": probe(v, x, V, a.steps, a.seed)}
    print(json.dumps(result, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
