"""Does retrieval find the past when it repeats? (RESULTS.md, "Retrieval diagnostics")

For held-out documents: the first --context tokens are streamed through the model into a fresh memory (the real
path, segment by segment); then a passage of --passage tokens copied verbatim from earlier in the document is fed
as the next segment. For every token of the copy we know the chunk its original sits in, so we can ask:

    query hit rate     the memory layer's real retrieval (the SideNet query, the model's metric) returns the
                       original chunk (or its neighbour) among its k_c chunks
    key->key ip / cos  the copy's own block-m chunk-mean key, searched by inner product / cosine: whether the
                       stored keys identify the content at all
    hub share          share of all retrievals that go to the 1% most retrieved chunks (1% if spread evenly)
    copy loss          next-token loss on the copy with the memory / without any memory

    .venv/bin/python scripts/retrieval_diagnostics.py [--model DIR] [--json results/retrieval_diagnostics.json]
"""
import argparse
import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from longmem.loading import TINY_MODEL, load_model_and_tokenizer
from longmem.tokens import token_ids


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="LongMem folder (default: the shipped models/longmem-tiny)")
    p.add_argument("--data", nargs="+", default=["data/books/test.jsonl", "data/code/test.jsonl"])
    p.add_argument("--context", type=int, default=4096, help="tokens written to memory before the copy")
    p.add_argument("--passage", type=int, default=128, help="tokens copied")
    p.add_argument("--copies", type=int, default=3, help="copies per document")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    model, tok = load_model_and_tokenizer(a.model or TINY_MODEL)
    model.eval()
    T, kc, csz = model.segment_length, model.config.topk_chunks, model.config.chunk_size
    rng = random.Random(a.seed)
    stats = {k: [] for k in ("query_hit", "key_ip_hit", "key_cos_hit", "hub_share", "loss_memory", "loss_no_memory")}
    for path in a.data:
        for line in open(path):
            ids = token_ids(tok, json.loads(line)["text"])
            if len(ids) < a.context:
                continue
            ids = ids[: a.context]
            mem = model.new_memory(1)
            with torch.no_grad():
                for s in range(0, a.context, T):
                    model(torch.tensor([ids[s:s + T]]), memory=mem)
            search, queries, chunks = mem.search, [], []

            def spy(q, **kw):
                r = search(q, **kw)
                queries.append(q.float())
                chunks.append(r.chunks)
                return r

            mem.search = spy
            stored = mem.chronological(0)[0].float().mean(2)  # (Hkv, N, Dh) raw chunk-mean keys, oldest first
            for _ in range(a.copies):
                src = rng.randrange(0, a.context - T - a.passage)  # at least one window back
                copy = torch.tensor([ids[src:src + a.passage]])
                queries.clear(), chunks.clear()
                with torch.no_grad():
                    lm = model(copy, memory=mem, update_memory=False, labels=copy).loss.item()
                    ln = model(copy, memory=None, labels=copy).loss.item()
                    kv = model.backbone(copy, model.memory_layer, upto=model.memory_layer)
                got = chunks[0][0]  # (H, P, kc)
                H, P = got.shape[0], got.shape[1]
                G = H // stored.shape[0]
                near = lambda found, t: any(abs(x - (src + t) // csz) <= 1 for x in found)  # noqa: E731
                stats["query_hit"].append(np.mean([near(got[h, t].tolist(), t) for h in range(H) for t in range(8, P)]))
                own = kv.keys[0].float()  # (Hkv, P, Dh)
                for name, norm in (("key_ip_hit", False), ("key_cos_hit", True)):
                    hits = []
                    for c in range(2, P // csz):
                        q = own[:, c * csz:(c + 1) * csz].mean(1)
                        base = F.normalize(stored, dim=-1) if norm else stored
                        top = torch.einsum("hd,hnd->hn", q, base).topk(kc, dim=-1).indices
                        hits += [near(top[h].tolist(), c * csz) for h in range(top.shape[0])]
                    stats[name].append(np.mean(hits))
                counts = Counter(got.flatten().tolist())
                top1 = max(1, len(stored[0]) // 100)
                stats["hub_share"].append(sum(n for _, n in counts.most_common(top1)) / got.numel())
                stats["loss_memory"].append(lm)
                stats["loss_no_memory"].append(ln)
                del G
    summary = {k: float(np.mean(v)) for k, v in stats.items()}
    summary.update(model=a.model or "models/longmem-tiny", metric=model.config.retrieval_metric, copies=len(stats["query_hit"]),
                   chance_hit=3 * kc / (a.context // csz))
    print(json.dumps(summary, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
