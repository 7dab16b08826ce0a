"""Can the model copy text that only its memory holds? (RESULTS.md, "Recall of made-up lines")

A command-line front to ``longmem.eval.memory_copy.memory_copy_eval`` (its docstring defines every measure).

    .venv/bin/python scripts/memory_copy_eval.py --model runs/memcopy --json results/memory_copy.json
"""
import argparse
import json
from pathlib import Path

from longmem.eval.memory_copy import memory_copy_eval
from longmem.loading import TINY_MODEL, load_model_and_tokenizer, resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="LongMem folder (default: the shipped longmem-tiny)")
    p.add_argument("--data", nargs="+", default=["data/code/test.jsonl", "data/books/test.jsonl"])
    p.add_argument("--piece-chars", type=int, default=8000)
    p.add_argument("--pieces", type=int, default=6, help="pieces per document")
    p.add_argument("--lines", type=int, default=3, help="made-up lines per piece")
    p.add_argument("--min-back", type=int, default=3000, help="characters between an insertion and the piece end")
    p.add_argument("--cue", type=int, default=3, help="tokens of each repeat given before scoring / generating")
    p.add_argument("--cue-name", action="store_true",
                   help="cue each repeat with its first name and ' =' (the rest of the line is what was assigned)")
    p.add_argument("--context", type=int, default=32, help="tokens before the repeat in the generation prompt")
    p.add_argument("--next-chunks", action="store_true",
                   help="also attend to the chunk after each retrieved one (LongMemConfig.retrieval_next)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    model, tok = load_model_and_tokenizer(a.model or TINY_MODEL, resolve_device(a.device))
    if a.next_chunks:
        model.config = model.config.replace(retrieval_next=True)
    texts = [json.loads(line)["text"] for path in a.data for line in open(path)]
    result = {"model": a.model or str(TINY_MODEL),
              **memory_copy_eval(model, tok, texts, a.piece_chars, a.pieces, a.lines, a.min_back, a.cue, a.cue_name,
                                 a.context, a.seed, progress=True)}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
