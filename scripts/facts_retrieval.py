"""Which chunks the memory block fetches for the planted facts: for each fact of `longmem eval facts`, the number of
the memory block's heads whose top-k chunks (at the token before the answer) include the fact's own chunks, and the
answer's log-probability with memory. Usage: python scripts/facts_retrieval.py [MODEL] (default smollm2-135m-longmem).
Output for the step-3,175 identity-start model: results/smollm2/identity-step3175/facts_retrieval.txt."""
import sys

import numpy as np
import torch

from longmem.loading import load_model_and_tokenizer
from longmem.eval.facts import FACTS, plant, emma_text
from longmem.eval.scoring import encode, fill_memory, split_context
torch.set_num_threads(1)
name = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m-longmem"
model, tok = load_model_and_tokenizer(name)[:2]
ids, starts = plant(tok, emma_text(), 16000)
T = model.segment_length
qs = [encode(tok, q) for _, q, _ in FACTS]
mem_ids, tail = split_context(ids, T - 8 - max(len(q) for q in qs), model.config.chunk_size)
memory = model.new_memory(1)
fill_memory(model, memory, mem_ids)
print("memory tokens", memory.num_tokens(0), "mem_ids", len(mem_ids))
rec = []
orig = memory.search
def spy(q, next_chunks=False):
    r = orig(q, next_chunks); rec.append(r.chunks.clone()); return r
memory.search = spy
for i, ((sent, q, ans), qi) in enumerate(zip(FACTS, qs)):
    s = starts[i]; L = len(encode(tok, sent)); fact_slots = set(range(s // 4, (s + L + 3) // 4))
    a = encode(tok, " " + ans)
    local = np.concatenate([tail, qi, a])
    rec.clear()
    x = torch.as_tensor(local).view(1, -1)
    with torch.no_grad():
        out = model(x, memory=memory, update_memory=False)
    ch = torch.cat(rec, dim=2) if len(rec) > 1 else rec[0]  # (1, H, T, kc)
    pos = len(tail) + len(qi) - 1  # predicts the answer's first token
    logp = torch.log_softmax(out.logits[0, pos:pos + len(a)].double(), -1).gather(1, torch.as_tensor(a).view(-1, 1)).sum()
    hits = [[int(c) in fact_slots for c in ch[0, h, pos].tolist()] for h in range(ch.shape[1])]
    heads_hit = sum(any(h) for h in hits)
    # over the question tokens
    qhits = sum(any(int(c) in fact_slots for c in ch[0, h, p].tolist()) for h in range(ch.shape[1]) for p in range(len(tail), pos + 1))
    print(f"fact {i} {ans!r} dist {len(ids)-s}: heads retrieving fact at answer pos {heads_hit}/{ch.shape[1]}, "
          f"(head,qtoken) hits {qhits}/{ch.shape[1]*(len(qi))}, answer logp {float(logp):.2f}, argmax {tok.decode(out.logits[0,pos].argmax().item())!r}")
