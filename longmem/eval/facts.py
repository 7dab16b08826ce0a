"""Planted facts: made-up facts hidden in a long held-out text, asked for at its end.

Five facts, in wordings and names that no training example uses, are inserted as sentences at
evenly spaced depths of the first ``tokens`` tokens of a document (by default *Emma*, the books
corpus's test novel). The document is written to memory except for its last local window, which
holds the document's end and one question; the answer is generated greedily (up to 8 tokens) and
counts when the generated text starts with it. Modes as in the pass-key test: ``longmem`` (window +
memory), ``no_memory`` (same weights, window only), ``backbone`` (the frozen backbone on the window).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from longmem.baselines import PlainBackbone
from longmem.data.corpora import AUSTEN_DATA, AUSTEN_NOVELS, AUSTEN_PACKAGE, read_austen_rdata
from longmem.errors import LongMemError
from longmem.eval.passkey import read_and_answer
from longmem.eval.scoring import MODES, fill_memory, split_context
from longmem.tokens import encode

# (sentence planted in the text, question asked at the end, expected answer)
FACTS = (
    (" Mr. Weston's new boat was named Albatross.", " What was Mr. Weston's new boat named? It was named", "Albatross"),
    (" Miss Bates kept exactly 4711 buttons in a jar.", " How many buttons did Miss Bates keep in a jar? She kept exactly",
     "4711"),
    (" The old parrot at Hartfield was called Socrates.", " What was the old parrot at Hartfield called? It was called",
     "Socrates"),
    (" The number painted on the Randalls carriage was 3856.",
     " What number was painted on the Randalls carriage? The number was", "3856"),
    (" Mrs. Goddard's cook came from the town of Kelmscott.",
     " Which town did Mrs. Goddard's cook come from? She came from the town of", "Kelmscott"),
)


def emma_text() -> str:
    """*Emma*, the books corpus's test novel (never used in training), from Debian's r-cran-janeaustenr."""
    if not (AUSTEN_DATA / "Rdata.rdx").is_file():
        raise LongMemError(f"Emma comes from Debian's {AUSTEN_PACKAGE}: `apt-get install {AUSTEN_PACKAGE}`, or pass --text FILE")
    name = next(k for k, (_, split) in AUSTEN_NOVELS.items() if split == "test")
    return read_austen_rdata(AUSTEN_DATA)[name]


def read_text_file(path) -> str:
    """A text file as UTF-8 (invalid bytes replaced), with a one-line error when it cannot be read."""
    try:
        return Path(path).read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise LongMemError(f"cannot read {path}: {e.strerror}") from None


def plant(tokenizer, text: str, tokens: int, facts=FACTS) -> tuple[np.ndarray, list[int]]:
    """The first ``tokens`` tokens of ``text`` with each fact's sentence inserted at evenly spaced depths (at a
    sentence end); returns the ids and where each fact starts."""
    pieces, starts, at = [], [], 0
    base = encode(tokenizer, text)[:tokens]
    doc = tokenizer.decode(base.tolist())
    cuts = [doc.find(". ", int(len(doc) * (i + 0.5) / (len(facts) + 1))) + 1 for i in range(len(facts))]
    if min(cuts) <= 0:
        raise LongMemError("the document has too few sentences to plant the facts in; give a longer text")
    for cut, (sentence, _, _) in zip(cuts, facts):
        pieces.append(encode(tokenizer, doc[at:cut]))
        starts.append(sum(len(p) for p in pieces))
        pieces.append(encode(tokenizer, sentence))
        at = cut
    pieces.append(encode(tokenizer, doc[at:]))
    return np.concatenate(pieces), starts


def evaluate_facts(model, tokenizer, text: str, tokens: int = 16000, modes=MODES, max_new_tokens: int = 8,
                   facts=FACTS) -> dict:
    """Each fact asked at the end of the planted document, in each mode; see the module docstring."""
    if tokens < 1000:
        raise LongMemError(f"--tokens must be at least 1000 (the facts must lie beyond the local window), got {tokens}")
    ids, starts = plant(tokenizer, text, tokens, facts)
    T = model.segment_length
    questions = [encode(tokenizer, question) for _, question, _ in facts]
    # one past for every question: the document but its last window; the window holds the rest and a question
    mem_ids, tail = split_context(ids, T - max_new_tokens - max(len(q) for q in questions), model.config.chunk_size)
    memory = None
    if "longmem" in modes:
        memory = model.new_memory(1)
        fill_memory(model, memory, mem_ids)
    rows = []
    for i, ((sentence, question, answer), q) in enumerate(zip(facts, questions)):
        local = np.concatenate([tail, q])
        row = {"fact": sentence.strip(), "question": question.strip(), "answer": answer,
               "distance": int(len(ids) - starts[i])}
        for mode in modes:
            net = PlainBackbone(model) if mode == "backbone" else model
            out, _ = read_and_answer(net, local, [], max_new_tokens, memory if mode == "longmem" else None)
            said = tokenizer.decode(out)
            row[mode] = {"generated": said, "right": said.strip().lower().startswith(answer.lower())}
        rows.append(row)
    return {"document_tokens": int(len(ids)), "segment_length": T, "facts": rows, "modes": list(modes),
            **{mode: sum(r[mode]["right"] for r in rows) for mode in modes}, "of": len(rows)}
