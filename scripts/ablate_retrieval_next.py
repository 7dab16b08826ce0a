"""Ablation on the shipped default (RESULTS.md, v3): the same weights with retrieval_next turned off.

Names (`longmem eval names`'s probe on the code test + validation splits) and code perplexity beyond the first window.

    .venv/bin/python scripts/ablate_retrieval_next.py      # writes results/v3/ablation_retrieval_next.json
"""
import json
from longmem import LongMem
from longmem.loading import load_tokenizer
from longmem.eval.recall import identifier_recall, COUNTS
from longmem.eval.perplexity import perplexity_table
from longmem.data.streams import encode_documents
tok = load_tokenizer("models/longmem-tiny/backbone")
texts = [json.loads(l)["text"] for f in ("data/code/test.jsonl", "data/code/validation.jsonl") for l in open(f)]
docs = encode_documents(["data/code/test.jsonl"], tok)
out = {}
for name, kw in [("shipped (key, cosine, next)", {}), ("next off", {"retrieval_next": False})]:
    m = LongMem.from_pretrained("models/longmem-tiny", **kw).eval()
    tot = dict.fromkeys(COUNTS, 0)
    for t in texts:
        r = identifier_recall(m, tok, t)
        for k in COUNTS: tot[k] += r[k]
    pt = perplexity_table(m, docs, modes=("longmem",))
    out[name] = {"names": tot, "code_ppl_beyond_window": pt["longmem"]["ppl_beyond_window"]}
    print(name, out[name], flush=True)
json.dump(out, open("results/v3/ablation_retrieval_next.json", "w"), indent=1)
