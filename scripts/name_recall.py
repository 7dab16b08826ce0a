"""Name recall with memory (RESULTS.md): memory = the first third of Emma (test split); prompts = later sentences ending right
before a character name; greedy continuations with and without memory.
Run: .venv/bin/python scripts/name_recall.py [OUT.json (default results/generation_names.json) [MODEL_DIR]]"""
import json, re, sys, torch
from longmem.loading import load_model_and_tokenizer
from longmem.store import ingest_file
from pathlib import Path
OUT = sys.argv[1] if len(sys.argv) > 1 else "results/generation_names.json"
model, tok = load_model_and_tokenizer(sys.argv[2] if len(sys.argv) > 2 else None)
model.eval()
emma = [json.loads(l) for l in open("data/books/test.jsonl")][0]["text"]
cut = len(emma) // 3
Path("/tmp/emma_part1.txt").write_text(emma[:cut])
mem = model.new_memory(1)
ingest_file(model, tok, mem, Path("/tmp/emma_part1.txt"))
print("memory tokens", mem.num_tokens(0))
names = ["Knightley", "Woodhouse", "Weston", "Elton", "Churchill", "Fairfax", "Bates", "Smith", "Martin"]
later = emma[cut:]
found = []
for m in re.finditer(r"(Mr\.|Mrs\.|Miss) (%s)" % "|".join(names), later):
    start = later.rfind(".", 0, m.start() - 200)
    prompt = later[max(0, m.start() - 300): m.start() + len(m.group(1))]
    found.append((prompt, m.group(2)))
    if len(found) >= 40:
        break
rows = []
for prompt, name in found:
    ids = torch.tensor([tok.backend_tokenizer.encode(prompt, add_special_tokens=False).ids])
    a = tok.decode(model.generate(ids, memory=None, max_new_tokens=6)[0, ids.shape[1]:].tolist())
    import copy
    b = tok.decode(model.generate(ids, memory=copy.deepcopy(mem), max_new_tokens=6)[0, ids.shape[1]:].tolist())
    rows.append({"prompt": prompt[-120:], "truth": name, "no_memory": a, "memory": b})
ok_mem = sum(r["memory"].strip().startswith(r["truth"]) for r in rows)
ok_no = sum(r["no_memory"].strip().startswith(r["truth"]) for r in rows)
print(f"name right: with memory {ok_mem}/{len(rows)}, without {ok_no}/{len(rows)}")
json.dump({"with_memory": ok_mem, "without": ok_no, "n": len(rows), "rows": rows}, open(OUT, "w"), indent=1)
for r in rows[:40]:
    print(repr(r["prompt"][-60:]), "| truth", r["truth"], "| mem", repr(r["memory"]), "| none", repr(r["no_memory"]))
