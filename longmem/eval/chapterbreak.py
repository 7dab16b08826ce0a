"""ChapterBreak (Sun et al., 2022; paper s4.2): which of six beginnings continues a long prefix?

Each example is a long prefix ``ctx`` that ends at a chapter boundary, the true beginning of the
next chapter ``pos`` and five beginnings of later chapters of the same work ``negs``. The model
picks the candidate it finds most likely after the prefix; chance is 1/6. The released file is

    {"pg19": {work_id: [{"ctx": str, "pos": str, "negs": [str, ...]}, ...]}, "ao3": {...}}

How one example is scored (the same for every mode, on the same tokens):

    prefix tokens  [ ......... memory part ......... | local part ]  candidate tokens
                     written to memory, T at a time    kept in the window with each candidate

The local window holds the last ``T - C`` prefix tokens followed by one candidate (C = the longest
candidate, at most ``max_candidate_tokens``); everything before goes to memory segment by segment
(``longmem`` mode only). Candidates are read with ``update_memory=False``: never written to memory.
A candidate's score is its summed token log-probability (the likelihood of the text) and its mean
(per token); accuracy is reported for both. Ties count as wrong: the true candidate must be
strictly best.

``chapterbreak-build`` writes the same format from any book with chapter headings, so the test runs
offline (e.g. on the Austen test novel, Emma). The scoring primitives at the top of this module
(``split_context``, ``fill_memory``, ``score_continuations``) live in ``longmem.eval.scoring``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from longmem.data.corpora import iter_documents
from longmem.errors import LongMemError
from longmem.eval.scoring import MODES, fill_memory, score_continuations, split_context
from longmem.tokens import encode

SPLITS = ("ao3", "pg19")


# --------------------------------------------------------------------------- the data file


@dataclass
class Example:
    split: str
    work: str
    index: int
    ctx: str
    candidates: list[str]  # the true beginning first, then the negatives

    @property
    def where(self) -> str:
        return f"{self.split}/{self.work}/{self.index}"


def load_chapterbreak(path, split: str = "all") -> list[Example]:
    """The examples of one split (``ao3``, ``pg19``) or ``all`` of a ChapterBreak JSON file, in file order."""
    if split not in SPLITS + ("all",):
        raise LongMemError(f"unknown split {split!r}; choose ao3, pg19 or all")
    path = Path(path)
    if not path.is_file():
        raise LongMemError(f"{path} does not exist; give the ChapterBreak JSON file (or build one with `longmem eval chapterbreak-build`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LongMemError(f"{path} is not valid JSON ({e}); expected the ChapterBreak format {{\"pg19\": {{...}}, \"ao3\": {{...}}}}") from None
    if not isinstance(data, dict) or not any(s in data for s in SPLITS):
        raise LongMemError(f"{path} is not in the ChapterBreak format: expected a JSON object with keys 'pg19' and/or 'ao3'")
    wanted = SPLITS if split == "all" else (split,)
    if split != "all" and split not in data:
        raise LongMemError(f"{path} has no {split!r} split (it has: {', '.join(s for s in SPLITS if s in data)})")
    examples = []
    for s in [s for s in data if s in wanted]:  # file order
        works = data[s]
        if not isinstance(works, dict):
            raise LongMemError(f"{path}: '{s}' must map work ids to lists of examples, got {type(works).__name__}")
        for work, items in works.items():
            if not isinstance(items, list):
                raise LongMemError(f"{path}: {s}/{work} must be a list of examples, got {type(items).__name__}")
            for i, item in enumerate(items):
                examples.append(_example(path, s, str(work), i, item))
    if not examples:
        raise LongMemError(f"{path} has no examples in split {split!r}")
    return examples


def _example(path, split, work, i, item) -> Example:
    where = f"{path}: {split}/{work}/{i}"
    if not isinstance(item, dict):
        raise LongMemError(f"{where} must be an object with 'ctx', 'pos' and 'negs'")
    missing = [k for k in ("ctx", "pos", "negs") if k not in item]
    if missing:
        raise LongMemError(f"{where} lacks {', '.join(repr(k) for k in missing)}; each example needs 'ctx', 'pos' and 'negs'")
    ctx, pos, negs = item["ctx"], item["pos"], item["negs"]
    if not isinstance(ctx, str) or not isinstance(pos, str):
        raise LongMemError(f"{where}: 'ctx' and 'pos' must be strings")
    if not isinstance(negs, list) or not negs or not all(isinstance(n, str) for n in negs):
        raise LongMemError(f"{where}: 'negs' must be a non-empty list of strings")
    if not ctx.strip() or not pos.strip() or not all(n.strip() for n in negs):
        raise LongMemError(f"{where} has an empty ctx or candidate")
    return Example(split, work, i, ctx, [pos] + list(negs))


# --------------------------------------------------------------------------- building examples from a book

# "CHAPTER I", "Chapter 12", "CHAPTER ONE", "Chapter 3. The Ball" on a line of their own
_CHAPTER = re.compile(
    r"^[ \t]*(?:CHAPTER|Chapter)[ \t]+(?:[IVXLCDM]+|[ivxlcdm]+|\d+|[A-Z][a-z]+(?:-[a-z]+)?|[A-Z]+(?:-[A-Z]+)?)"
    r"(?:[.:][^\n]{0,60})?[ \t]*$", re.M)
# "VOLUME II", "BOOK 3", "PART ONE": removed from contexts and candidates (they would date a chapter)
_VOLUME = re.compile(r"^[ \t]*(?:VOLUME|Volume|BOOK|Book|PART|Part)[ \t]+(?:[IVXLCDM]+|\d+|[A-Z][a-z]+|[A-Z]+)\.?[ \t]*$\n?",
                     re.M)


def find_chapters(text: str) -> tuple[list[int], list[str]]:
    """Start offsets of the chapter headings, and each chapter's body (heading and volume lines removed)."""
    heads = list(_CHAPTER.finditer(text))
    starts = [m.start() for m in heads]
    bodies = []
    for i, m in enumerate(heads):
        end = starts[i + 1] if i + 1 < len(heads) else len(text)
        bodies.append(_VOLUME.sub("", text[m.end():end]).strip())
    return starts, bodies


def _first_words(text: str, k: int) -> str:
    words = list(re.finditer(r"\S+", text))
    return text[: words[min(k, len(words)) - 1].end()] if words else ""


def _last_chars(text: str, n: int) -> str:
    """The last ~n characters of ``text``, starting at a word boundary."""
    if len(text) <= n:
        return text
    cut = len(text) - n
    space = re.search(r"\s", text[cut:])
    return text[cut + space.end():] if space else text[cut:]


def build_examples(text: str, *, negatives: int = 5, context_chars: int = 40000, candidate_words: int = 150,
                   seed: int = 0) -> list[dict]:
    """ChapterBreak examples from one book: one per chapter boundary with ``negatives`` later chapters.

    For the boundary before chapter j (j >= 1): ctx is the book before chapter j's heading (volume
    headings removed, the last ``context_chars`` characters, cut at a word); pos is the first
    ``candidate_words`` words of chapter j; negs are the beginnings of ``negatives`` chapters drawn
    (seeded) from those after j. Headings are never part of a candidate: their numbers would give
    the order away.
    """
    starts, bodies = find_chapters(text)
    if len(bodies) < negatives + 2:
        raise LongMemError(
            f"found {len(bodies)} chapter headings (lines like 'CHAPTER I' or 'Chapter 1'); a ChapterBreak example "
            f"needs a previous chapter and {negatives} later ones, so at least {negatives + 2}")
    rng = random.Random(seed)
    examples = []
    for j in range(1, len(bodies) - negatives):
        ctx = _last_chars(_VOLUME.sub("", text[:starts[j]]).rstrip(), context_chars)
        later = rng.sample(range(j + 1, len(bodies)), negatives)
        pos = _first_words(bodies[j], candidate_words)
        negs = [_first_words(bodies[i], candidate_words) for i in later]
        if ctx.strip() and pos and all(negs):
            examples.append({"ctx": ctx, "pos": pos, "negs": negs})
    return examples


def read_book(spec: str, doc_id: str | None = None, data_root="data") -> tuple[str, str]:
    """(id, text) of a book: ``austen:TITLE`` (from ``DATA_ROOT/books/*.jsonl``), a .jsonl (with ``doc_id``
    unless it holds one document) or a text file."""
    if spec.startswith("austen:"):
        title = spec[len("austen:"):]
        files = sorted((Path(data_root) / "books").glob("*.jsonl"))
        if not files:
            raise LongMemError(f"no Austen corpus under {Path(data_root) / 'books'}; run `longmem data books` first (or give --data-root)")
        seen = []
        for f in files:
            for doc in iter_documents(f):
                if doc.id.lower() == title.lower():
                    return doc.id, doc.text
                seen.append(doc.id)
        raise LongMemError(f"no novel {title!r} in {Path(data_root) / 'books'}; it has: {', '.join(seen)}")
    docs = list(iter_documents(spec))
    if doc_id is not None:
        for doc in docs:
            if doc.id == doc_id:
                return doc.id, doc.text
        raise LongMemError(f"no document with id {doc_id!r} in {spec}; it has: {', '.join(d.id for d in docs[:20])}")
    if len(docs) != 1:
        raise LongMemError(f"{spec} holds {len(docs)} documents; choose one with --id")
    return docs[0].id, docs[0].text


# --------------------------------------------------------------------------- evaluation


def evaluate_chapterbreak(model, tokenizer, examples: list[Example], *, modes=MODES, memory_kwargs: dict | None = None,
                          max_candidate_tokens: int | None = None, max_context_tokens: int | None = None,
                          progress: bool = False) -> dict:
    """Accuracy of each mode at picking the true next-chapter beginning.

    Returns:
        {mode: {"accuracy_sum", "accuracy_mean", "examples", "chance", "by_split": {split: ...}},
         "examples": [{"id", "candidates", "context_tokens", "memory_tokens", "scores": {mode: {"sum": [...],
         "mean": [...]}}}]}; in ``scores`` the true candidate is first.
    """
    memory_kwargs = dict(memory_kwargs or {})
    T = model.segment_length
    C = max_candidate_tokens or T // 2
    if not 1 <= C < T:
        raise LongMemError(f"--max-candidate-tokens must be between 1 and the local window - 1 ({T - 1}), got {C}")
    chunk = memory_kwargs.get("chunk_size") or model.config.chunk_size
    records = []
    was_training = model.training
    model.eval()
    for ex in tqdm(examples, desc="chapterbreak", unit="ex", disable=not progress, leave=False):
        ctx = encode(tokenizer, ex.ctx.rstrip() + "\n\n")
        if max_context_tokens:
            ctx = ctx[-max_context_tokens:]
        cands = [encode(tokenizer, c.strip())[:C] for c in ex.candidates]
        if len(ctx) == 0 or min(len(c) for c in cands) == 0:
            raise LongMemError(f"{ex.where}: the context or a candidate has no tokens")
        mem_ids, local = split_context(ctx, T - max(len(c) for c in cands), chunk)
        scores = {}
        for mode in modes:
            memory = None
            if mode == "longmem":
                memory = model.new_memory(len(cands), **memory_kwargs)
                fill_memory(model, memory, mem_ids)
            s = score_continuations(model, mode, local, cands, memory)
            scores[mode] = {"sum": [float(lp.sum()) for lp in s.logprobs], "mean": [float(lp.mean()) for lp in s.logprobs]}
        records.append({"id": ex.where, "split": ex.split, "candidates": len(cands), "context_tokens": len(ctx),
                        "memory_tokens": len(mem_ids), "candidate_tokens": [len(c) for c in cands], "scores": scores})
    model.train(was_training)
    report = {mode: _accuracy(records, mode) for mode in modes}
    report["examples"] = records
    return report


def _correct(scores: list[float]) -> bool:
    return scores[0] > max(scores[1:])  # strictly best: a tie is not a win


def _accuracy(records: list[dict], mode: str) -> dict:
    def summary(rs):
        n = len(rs)
        return {
            "accuracy_sum": sum(_correct(r["scores"][mode]["sum"]) for r in rs) / n,
            "accuracy_mean": sum(_correct(r["scores"][mode]["mean"]) for r in rs) / n,
            "examples": n,
            "chance": sum(1 / r["candidates"] for r in rs) / n,
        }

    out = summary(records)
    present = [s for s in SPLITS if any(r["split"] == s for r in records)]
    out["by_split"] = {s: summary([r for r in records if r["split"] == s]) for s in present}
    return out
