"""Memory-augmented in-context learning (paper s4.3): k demonstrations in the window, N more in memory.

The protocol of the paper and its released script (``eval_longmem_icl.py``):

- templates ``"Review: {x} Sentiment: {y}. "`` (Subj: ``"Input: {x} Type: {y}. "``); label words
  positive/negative (SST-2, MR, MPQA; 1 = positive), terrible/bad/okay/good/great (SST-5, 0..4),
  subjective/objective (Subj; 0 = subjective);
- per seed: k demonstrations sampled from the training pool for the local context, then N sampled
  for the memory (the two samples may overlap, as in the release); memory chunk size 2;
- the test prompt ``"Review: {x} Sentiment:"`` follows the k demonstrations; it is never written to
  memory (the memory holds exactly the N demonstrations' tokens throughout);
- accuracy per seed, then mean and (population) std over seeds.

Two decision rules, both reported:

``greedy``      the official rule: the label whose tokens the model's greedy continuation of the
                prompt starts with (the longest such label; none = wrong). Computed exactly by
                teacher forcing each label (``Scores.greedy``). For one-token labels this is the
                release's "first generated token is the label word".
``likelihood``  the label word with the highest log-probability after the prompt (summed over its
                tokens).

Tokenization: each demonstration is tokenized on its own as ``" " + template.format(x, y)`` without
the trailing space (the separator space moves to the front of the next one), so that concatenating
the pieces gives exactly the tokens of the whole text, and counts add up. When k demonstrations and
the prompt do not fit the local window, the oldest demonstrations are dropped (reported as
``local_demos``).
"""

from __future__ import annotations

import csv
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from longmem.errors import LongMemError
from longmem.eval.scoring import MODES, fill_memory, score_continuations
from longmem.tokens import encode

SENTIMENT = "Review: {x} Sentiment: {y}. "


@dataclass(frozen=True)
class Task:
    name: str
    template: str
    labels: tuple[str, ...]  # label words, indexed by the integer label

    def demonstration(self, text: str, label: int) -> str:
        return " " + self.template.format(x=text, y=self.labels[label]).rstrip()

    def prompt(self, text: str) -> str:
        return " " + self.template.split("{y}")[0].format(x=text).rstrip()

    def label_continuations(self) -> list[str]:
        return [" " + word for word in self.labels]


TASKS = {
    "sst2": Task("sst2", SENTIMENT, ("negative", "positive")),
    "mr": Task("mr", SENTIMENT, ("negative", "positive")),
    "mpqa": Task("mpqa", SENTIMENT, ("negative", "positive")),
    "sst5": Task("sst5", SENTIMENT, ("terrible", "bad", "okay", "good", "great")),
    "subj": Task("subj", "Input: {x} Type: {y}. ", ("subjective", "objective")),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise LongMemError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return TASKS[name]


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    text: str
    label: int


def _label(task: Task, raw, where: str) -> int:
    s = str(raw).strip().strip('"').lower()
    if s.lstrip("-").isdigit():
        i = int(s)
        if 0 <= i < len(task.labels):
            return i
    elif s in task.labels:
        return task.labels.index(s)
    raise LongMemError(f"{where}: label {raw!r} is not one of {task.name}'s labels (0-{len(task.labels) - 1} or {', '.join(task.labels)})")


def _text(raw, where: str) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise LongMemError(f"{where}: empty or missing text")
    return " ".join(raw.strip().strip('"').split())


def load_examples(path, task: Task) -> list[Example]:
    """Labelled sentences from a TSV with a header (``sentence<TAB>label``, as GLUE SST-2), a CSV
    (``label,text`` lines as in the LongMem release, or with a header naming ``label`` and ``text``),
    a JSONL of ``{"text", "label"}``, or ``hf:NAME[:SPLIT]`` (needs ``datasets``). Labels are
    integers or label words."""
    spec = str(path)
    if spec.startswith("hf:"):
        return _load_hf(spec, task)
    p = Path(path)
    if not p.is_file():
        raise LongMemError(f"{p} does not exist; give a .tsv, .csv or .jsonl file, or hf:NAME")
    lines = p.read_text(encoding="utf-8", errors="replace").splitlines()
    if not any(line.strip() for line in lines):
        raise LongMemError(f"{p} holds no examples (it is empty); give labelled examples in a .tsv, .csv or .jsonl file")
    if p.suffix == ".tsv":
        out = _load_table(p, lines, task, delimiter="\t")
    elif p.suffix == ".csv":
        first = lines[0].split(",") if lines else []
        if first and first[0].strip().lower() in ("label", "text", "sentence"):
            out = _load_table(p, lines, task, delimiter=",")
        else:  # label,text (the text may hold commas)
            out = []
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                label, sep, text = line.partition(",")
                if not sep:
                    raise LongMemError(f"{p}:{n} is not a 'label,text' line")
                out.append(Example(_text(text, f"{p}:{n}"), _label(task, label, f"{p}:{n}")))
    elif p.suffix == ".jsonl":
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise LongMemError(f"{p}:{n} is not valid JSON ({e.msg}); each line must be {{\"text\": ..., \"label\": ...}}") from None
            if not isinstance(row, dict) or "label" not in row or not ("text" in row or "sentence" in row):
                raise LongMemError(f"{p}:{n} needs 'text' and 'label' fields")
            out.append(Example(_text(row.get("text", row.get("sentence")), f"{p}:{n}"), _label(task, row["label"], f"{p}:{n}")))
    else:
        raise LongMemError(f"{p}: unknown format {p.suffix!r}; give a .tsv (sentence<TAB>label), .csv (label,text) or .jsonl ({{text, label}})")
    if not out:
        raise LongMemError(f"{p} holds no examples")
    return out


def _load_table(p: Path, lines: list[str], task: Task, delimiter: str) -> list[Example]:
    reader = csv.reader(lines, delimiter=delimiter, quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL)
    header = [h.strip().lower() for h in next(reader, [])]
    text_col = next((c for c in ("sentence", "text") if c in header), None)
    if text_col is None or "label" not in header:
        raise LongMemError(f"{p}: the header must name a 'sentence' (or 'text') column and a 'label' column, got {header}")
    ti, li = header.index(text_col), header.index("label")
    out = []
    for n, row in enumerate(reader, 2):
        if not row or not "".join(row).strip():
            continue
        if len(row) <= max(ti, li):
            raise LongMemError(f"{p}:{n} has {len(row)} fields, the header has {len(header)}")
        out.append(Example(_text(row[ti], f"{p}:{n}"), _label(task, row[li], f"{p}:{n}")))
    return out


def _load_hf(spec: str, task: Task) -> list[Example]:
    name, _, split = spec[len("hf:"):].partition(":")
    try:
        import datasets
    except ImportError:
        raise LongMemError(f"{spec!r} needs the HuggingFace datasets package; pip install datasets, or give a local file") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown name or split
        raise LongMemError(f"could not load HuggingFace dataset {name!r} ({type(e).__name__}); check the name and split") from None
    col = next((c for c in ("sentence", "text") if c in ds.column_names), None)
    if col is None or "label" not in ds.column_names:
        raise LongMemError(f"HuggingFace dataset {name!r} needs a 'sentence' or 'text' column and a 'label' column (has {ds.column_names})")
    return [Example(_text(r[col], f"{spec}[{i}]"), _label(task, r["label"], f"{spec}[{i}]")) for i, r in enumerate(ds)]


# --------------------------------------------------------------------------- decision rules


def predict_greedy(label_ids: list[np.ndarray], greedy: list[np.ndarray]) -> int | None:
    """The label whose tokens the greedy continuation starts with (the longest if several), else None."""
    matches = [i for i, g in enumerate(greedy) if bool(np.all(g))]
    return max(matches, key=lambda i: len(label_ids[i])) if matches else None


def predict_likelihood(logprobs: list[np.ndarray]) -> int:
    """The label with the highest summed log-probability (the first on ties)."""
    return int(np.argmax([lp.sum() for lp in logprobs]))


# --------------------------------------------------------------------------- evaluation


def local_context(demos: list[np.ndarray], prompt: np.ndarray, budget: int) -> tuple[np.ndarray, int]:
    """The most recent demonstrations that fit with the prompt in ``budget`` tokens, then the prompt
    (cut from the left if it alone is too long). Returns (ids, number of demonstrations kept)."""
    if len(prompt) >= budget:
        return prompt[len(prompt) - budget:], 0
    kept, room = 0, budget - len(prompt)
    for d in reversed(demos):
        if len(d) > room:
            break
        room -= len(d)
        kept += 1
    parts = demos[len(demos) - kept:] + [prompt]
    return np.concatenate(parts), kept


def evaluate_icl(model, tokenizer, task: Task, test: list[Example], pool: list[Example], *, k: int = 20,
                 memory_demos: int = 2000, seeds: int = 6, seed: int = 1, modes=MODES, memory_kwargs: dict | None = None,
                 progress: bool = False, warn=None, keep_scores: bool = False) -> dict:
    """Accuracy of each mode by both rules, per seed (seeds ``seed .. seed + seeds - 1``), mean and std.

    ``keep_scores``: also report, per mode, ``scores[seed][example]`` = each label's summed log-probability.

    ``memory_kwargs``: memory overrides; chunk size defaults to 2 (the paper's ICL setting) and the
    memory size to the model's, enlarged to hold all N demonstrations.
    """
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if k < 0 or memory_demos < 0 or seeds < 1:
        raise LongMemError(f"--k and --memory-demos must be >= 0 and --seeds >= 1, got {k}, {memory_demos}, {seeds}")
    if len(pool) < k:
        warn(f"the training pool has {len(pool)} examples, fewer than k={k}; all of them are used as local demonstrations")
    if len(pool) < memory_demos:
        warn(f"the training pool has {len(pool)} examples, fewer than --memory-demos {memory_demos}; the whole pool goes to memory")
    T = model.segment_length
    labels = [encode(tokenizer, c) for c in task.label_continuations()]
    budget = T + 1 - max(len(x) for x in labels)  # the window reads the prompt and each label but its last token
    if budget < 1:
        raise LongMemError(f"the label words need {T + 1 - budget} tokens: no room for a prompt in the {T}-token local window")
    prompts = [encode(tokenizer, task.prompt(ex.text)) for ex in test]
    if any(len(p) > budget for p in prompts):
        warn(f"some test prompts are longer than the local window leaves room for ({budget} tokens); their beginning is cut")
    kw = dict(memory_kwargs or {})
    kw.setdefault("chunk_size", 2)
    was_training = model.training
    model.eval()
    per_seed = {m: {"greedy": [], "likelihood": [], "local_demos": [], "memory_tokens": [], "scores": []} for m in modes}
    bar = tqdm(total=seeds * len(test), desc=f"icl {task.name}", unit="ex", disable=not progress, leave=False)
    for s in range(seed, seed + seeds):
        rng = random.Random(s)
        local_demos = rng.sample(pool, min(k, len(pool)))
        mem_demos = rng.sample(pool, min(memory_demos, len(pool)))
        local_ids = [encode(tokenizer, task.demonstration(ex.text, ex.label)) for ex in local_demos]
        mem_ids = [encode(tokenizer, task.demonstration(ex.text, ex.label)) for ex in mem_demos]
        mem_stream = np.concatenate(mem_ids) if mem_ids else np.zeros(0, dtype=np.int64)
        memory = None
        if "longmem" in modes:
            memory = _demo_memory(model, len(labels), mem_stream, kw, warn)
        right = {m: {"greedy": 0, "likelihood": 0, "local_demos": 0} for m in modes}
        scores = {m: [] for m in modes}
        for ex, prompt in zip(test, prompts):
            context, kept = local_context(local_ids, prompt, budget)
            for mode in modes:
                sc = score_continuations(model, mode, context, labels, memory if mode == "longmem" else None)
                right[mode]["greedy"] += predict_greedy(labels, sc.greedy) == ex.label
                right[mode]["likelihood"] += predict_likelihood(sc.logprobs) == ex.label
                right[mode]["local_demos"] += kept
                scores[mode].append([float(lp.sum()) for lp in sc.logprobs])
            bar.update(1)
        for mode in modes:
            per_seed[mode]["greedy"].append(right[mode]["greedy"] / len(test))
            per_seed[mode]["likelihood"].append(right[mode]["likelihood"] / len(test))
            per_seed[mode]["local_demos"].append(right[mode]["local_demos"] / len(test))
            per_seed[mode]["scores"].append(scores[mode])
            if mode == "longmem":  # read after every test prompt was scored: they must not be there
                per_seed[mode]["memory_tokens"].append(memory.num_tokens(0) + memory.num_pending(0))
    bar.close()
    model.train(was_training)
    report = {"task": task.name, "label_words": list(task.labels), "k": k, "memory_demos": min(memory_demos, len(pool)),
              "seeds": list(range(seed, seed + seeds)), "test_examples": len(test), "pool_examples": len(pool),
              "chance": 1 / len(task.labels), "segment_length": T}
    for mode in modes:
        r = per_seed[mode]
        report[mode] = {"accuracy_greedy": _mean_std(r["greedy"]), "accuracy_likelihood": _mean_std(r["likelihood"]),
                        "local_demos": float(np.mean(r["local_demos"]))}
        if mode == "longmem":
            report[mode]["memory_tokens"] = r["memory_tokens"]
        if keep_scores:
            report[mode]["scores"] = r["scores"]
    return report


def _demo_memory(model, rows: int, stream: np.ndarray, kw: dict, warn):
    """A memory with ``rows`` identical rows holding the demonstration stream."""
    csz = kw["chunk_size"]
    needed = max(csz, -(-len(stream) // csz) * csz)
    size = kw.get("memory_size")
    if size is None:
        size = max(model.config.memory_size, needed)
        size = -(-size // csz) * csz
    elif size < len(stream):
        warn(f"--memory-size {size} is smaller than the {len(stream)} demonstration tokens; the oldest are evicted")
    memory = model.new_memory(rows, **{**kw, "memory_size": size})
    fill_memory(model, memory, stream)
    return memory


def _mean_std(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "per_seed": [float(v) for v in values]}
