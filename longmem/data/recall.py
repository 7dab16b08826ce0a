"""Copy-rich corpora: text that only a memory (or an in-context copy) can predict (``longmem data recall``).

Two kinds, both written as JSONL (``{"id", "text"}`` a line):

- **recall pieces** (:func:`write_recall_corpus`): every document cut into pieces of ``piece_chars`` characters,
  each followed by ``passages`` passages of ``passage_chars`` characters copied from earlier in the same piece, each
  at least ``min_back`` characters before the piece's end (more than one local window back, so only the memory holds
  them). With ``random_lines`` K, K made-up lines (:func:`made_up_line`) are also inserted at line starts early in the
  piece and copied at its end with the passages: text no model can guess, so only copying predicts the repeats.
- **copy-dense documents** (:func:`write_dense_corpus`): 1,500 characters of a random document, ``lines`` made-up
  lines, the next 1,500 characters, then the same lines shuffled: a third of the tokens can be predicted only by
  copying.

The original text is kept whole, so ordinary language modelling still makes up most tokens of a recall piece.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from longmem.errors import LongMemError
from longmem.io import atomic_write

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
    """Yield the recall pieces of one document (module docstring); a piece too short for a copy is yielded as is."""
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


def read_texts(path) -> list[tuple[object, str]]:
    """(id, text) of every line of a JSONL file; a missing file or a bad line is one clear error."""
    if not Path(path).is_file():
        raise LongMemError(f"{path} is not a file; give JSONL files with a 'text' field")
    docs = []
    with open(path, encoding="utf-8", errors="replace") as src:
        for i, line in enumerate(src):
            try:
                doc = json.loads(line)
                docs.append((doc.get("id", i), doc["text"]))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise LongMemError(f"line {i + 1} of {path} is not a JSON object with a 'text' field") from None
    return docs


def write_recall_corpus(inputs, out: Path, piece_chars: int, passages: int, passage_chars: int, min_back: int,
                        seed: int, every: int = 1, random_lines: int = 0) -> tuple[int, int]:
    """Augment every ``every``-th document of the JSONL ``inputs`` into ``out`` (written whole or not at all);
    returns (documents, characters)."""
    if min(piece_chars, passage_chars, every) < 1 or min(passages, min_back, random_lines) < 0:
        raise LongMemError(f"piece_chars, passage_chars and every must be >= 1, passages, min_back and random_lines "
                           f">= 0; got {piece_chars}, {passage_chars}, {every}, {passages}, {min_back}, {random_lines}")
    for path in inputs:  # every input checked before anything is written
        if not Path(path).is_file():
            raise LongMemError(f"{path} is not a file; give JSONL files with a 'text' field")
    rng = random.Random(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    counts = [0, 0]

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            for path in inputs:
                for i, (doc_id, text) in enumerate(read_texts(path)):
                    if i % every:
                        continue
                    for j, piece in enumerate(augment(text, rng, piece_chars, passages, passage_chars, min_back,
                                                      random_lines)):
                        f.write(json.dumps({"id": f"{doc_id}#{j}", "text": piece}) + "\n")
                        counts[0] += 1
                        counts[1] += len(piece)

    atomic_write(out, write)
    return counts[0], counts[1]


def write_dense_corpus(inputs, out: Path, documents: int, lines: int, seed: int) -> tuple[int, int]:
    """``documents`` copy-dense documents (module docstring) drawn from the JSONL ``inputs`` (their texts longer than
    4,000 characters); returns (documents, characters)."""
    rng = random.Random(seed)
    texts = [t for path in inputs for _, t in read_texts(path) if len(t) > 4000]
    if not texts:
        raise LongMemError(f"no document longer than 4,000 characters in {', '.join(map(str, inputs))}; "
                           "copy-dense documents need longer ones")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    chars = 0

    def write(tmp: str) -> None:
        nonlocal chars
        with open(tmp, "w") as f:
            for i in range(documents):
                t = rng.choice(texts)
                s = rng.randrange(0, len(t) - 3200)
                invented = [made_up_line(rng) for _ in range(lines)]
                repeated = invented[:]
                rng.shuffle(repeated)
                doc = (t[s:s + 1500] + "\n" + "\n".join(invented) + "\n" + t[s + 1500:s + 3000] + "\n"
                       + "\n".join(repeated) + "\n")
                f.write(json.dumps({"id": f"dense{i}", "text": doc}) + "\n")
                chars += len(doc)

    atomic_write(out, write)
    return documents, chars
