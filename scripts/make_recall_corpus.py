"""Recall-augmented training corpus (RECIPE.md, section 6).

Cuts every document into pieces of --piece-chars characters and appends to each piece --passages passages copied
from earlier in the same piece (each at least --min-back characters before the piece's end, so more than one local
window back: the only place the model can find them is its memory). The loss on the repeated passages rewards
retrieving from memory; the original text is kept whole, so ordinary language modelling still makes up most tokens.
With --random-lines K, K lines of made-up identifiers are also inserted at line starts early in each piece and
copied at its end with the passages: text no model can guess, so only copying from memory predicts their repeats.
With --dense N, N documents are drawn instead, each 1,500 characters of a random document, --dense-lines made-up
lines, the next 1,500 characters, then the same lines shuffled: a third of the tokens can be predicted only by copying.

    .venv/bin/python scripts/make_recall_corpus.py data/books/train.jsonl data/code/train.jsonl --out data/recall/train.jsonl
"""
import argparse
import json
import random
from pathlib import Path


_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwxz", "aeiou"


def made_up_line(rng: random.Random) -> str:
    """A line of code-like text with made-up names, e.g. ``vokaru_ti = pelzo(nimaxe, 4172)``."""
    def word():
        return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(rng.randint(2, 4)))

    def name():
        return "_".join(word() for _ in range(rng.randint(1, 2)))

    return f"{name()} = {name()}({name()}, {rng.randint(0, 9999)})"


def augment(text: str, rng: random.Random, piece_chars: int, passages: int, passage_chars: int, min_back: int,
            random_lines: int = 0):
    for start in range(0, len(text), piece_chars):
        piece = text[start:start + piece_chars]
        limit = len(piece) - min_back - passage_chars
        if limit <= 0:
            yield piece
            continue
        invented = []
        for _ in range(random_lines):
            line = made_up_line(rng)
            a = piece.rfind("\n", 0, rng.randrange(0, limit)) + 1
            piece = piece[:a] + line + "\n" + piece[a:]
            invented.append(line)
        copies = []
        for _ in range(passages):
            a = rng.randrange(0, limit)
            a = piece.rfind("\n", 0, a) + 1  # start at a line start, as a quotation or a repeated code line would
            copies.append(piece[a:a + passage_chars])
        if invented:
            copies += invented
            rng.shuffle(copies)
        yield piece + "\n\n" + "\n\n".join(copies)


def write_corpus(inputs, out: Path, piece_chars: int, passages: int, passage_chars: int, min_back: int, seed: int,
                 every: int = 1, random_lines: int = 0) -> tuple[int, int]:
    """Augment every ``every``-th document of the JSONL ``inputs`` into ``out``; returns (documents, characters)."""
    rng = random.Random(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = chars = 0
    with open(out, "w") as f:
        for path in inputs:
            for i, line in enumerate(open(path)):
                if i % every:
                    continue
                doc = json.loads(line)
                for j, piece in enumerate(augment(doc["text"], rng, piece_chars, passages, passage_chars, min_back,
                                                          random_lines)):
                    f.write(json.dumps({"id": f"{doc.get('id', i)}#{j}", "text": piece}) + "\n")
                    n += 1
                    chars += len(piece)
    return n, chars


def write_dense(inputs, out: Path, documents: int, lines: int, seed: int) -> tuple[int, int]:
    """``documents`` copy-dense documents (module docstring) drawn from the JSONL ``inputs``."""
    rng = random.Random(seed)
    texts = [t for path in inputs for t in (json.loads(line)["text"] for line in open(path)) if len(t) > 4000]
    out.parent.mkdir(parents=True, exist_ok=True)
    chars = 0
    with open(out, "w") as f:
        for i in range(documents):
            t = rng.choice(texts)
            s = rng.randrange(0, len(t) - 3200)
            invented = [made_up_line(rng) for _ in range(lines)]
            repeated = invented[:]
            rng.shuffle(repeated)
            doc = t[s:s + 1500] + "\n" + "\n".join(invented) + "\n" + t[s + 1500:s + 3000] + "\n" + "\n".join(repeated) + "\n"
            f.write(json.dumps({"id": f"dense{i}", "text": doc}) + "\n")
            chars += len(doc)
    return documents, chars


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+", help="JSONL files with a 'text' field")
    p.add_argument("--out", required=True)
    p.add_argument("--piece-chars", type=int, default=8000)
    p.add_argument("--passages", type=int, default=4)
    p.add_argument("--passage-chars", type=int, default=400)
    p.add_argument("--min-back", type=int, default=2000, help="characters between a passage's source and the piece end")
    p.add_argument("--random-lines", type=int, default=0, help="made-up lines inserted early in each piece and copied")
    p.add_argument("--every", type=int, default=1, help="use every N-th document only")
    p.add_argument("--dense", type=int, default=0, help="write this many copy-dense documents instead (see above)")
    p.add_argument("--dense-lines", type=int, default=25, help="made-up lines per copy-dense document")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.dense:
        n, chars = write_dense(a.inputs, Path(a.out), a.dense, a.dense_lines, a.seed)
        print(f"{n} documents, {chars:,} characters -> {a.out}")
        return
    n, chars = write_corpus(a.inputs, Path(a.out), a.piece_chars, a.passages, a.passage_chars, a.min_back, a.seed,
                            a.every, a.random_lines)
    print(f"{n} documents, {chars:,} characters -> {a.out}")


if __name__ == "__main__":
    main()
