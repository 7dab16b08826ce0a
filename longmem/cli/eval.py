"""``longmem eval``: the paper's evaluations (s4) on LongMem checkpoints.

    longmem eval ppl                 long-context perplexity (PG-22 style length splits; longmem.eval.perplexity)
    longmem eval chapterbreak        ChapterBreak suffix identification (longmem.eval.chapterbreak)
    longmem eval chapterbreak-build  ChapterBreak-format examples from any book with chapters
    longmem eval icl                 memory-augmented in-context learning (longmem.eval.icl)
    longmem eval passkey             pass-key retrieval beyond the local window (longmem.eval.passkey)
    longmem eval facts               made-up facts planted in a long text, asked for at its end (longmem.eval.facts)
    longmem eval names               names defined far back in code, completed from memory (longmem.eval.recall)
    longmem eval harness             any lm-evaluation-harness task (longmem.eval.harness; pip install 'longmem[eval]')

Each command is one ``Task`` declaration below its run function: its help, its options in the order ``--help``
lists them, and what it runs. The options several commands share (``--model``/``--device``/``--dtype``, the memory
sizes, ``--json``/``--plot``/``--no-progress``) are declared once (``model_options``, ``memory_options``,
``output_options``).

Every evaluation compares three modes of one checkpoint on the same tokens: ``longmem`` (SideNet
reading the memory), ``no_memory`` (same weights, no retrieval) and ``backbone`` (the frozen LM).

``ppl --json`` layout. One ``--model``: ``{"longmem": S, "no_memory": S, "backbone": S,
"baseline:NAME": S, "meta": {...}}``. Several: the same summaries under ``"<model name>/<mode>"``
keys (model name = the folder's name), and ``"meta"``. Each summary S is ``NLL.summary()`` of
``longmem.eval.perplexity`` (``ppl``, ``ppl_beyond_window``, ``loss``, ``tokens``, ``tokens_beyond_window``,
``ppl_by_position``, ``tokens_by_position``) plus ``by_length``: ``{split: {"ppl",
"ppl_beyond_window", "tokens", "documents"}}`` for the non-empty document-length splits.

Every result file (``--json`` of each task, and of ``longmem perplexity``, ``demo`` and ``staleness``)
also holds ``longmem_version`` (the package that wrote it), ``format_version`` (``RESULT_FORMAT``) and
``sha256``: the hex sha256 of the canonical JSON (sorted keys, no spaces) of everything else in the
file (``longmem.io``). ``verify_result(path)`` checks it: a truncated or altered file is refused.
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from longmem.data.corpora import iter_documents
from longmem.errors import LongMemError
from longmem.eval.chapterbreak import build_examples, evaluate_chapterbreak, load_chapterbreak, read_book
from longmem.eval.icl import evaluate_icl, get_task, load_examples
from longmem.eval.facts import emma_text, evaluate_facts, read_text_file
from longmem.eval.passkey import FULL as PASSKEY_FULL
from longmem.eval.passkey import evaluate_passkey
from longmem.eval.perplexity import BUCKETS, bucket_name, format_ppl, run_ppl
from longmem.plots import plot_bars, plot_lines
from longmem.eval.recall import names_report
from longmem.eval.scoring import MODES
from longmem.io import check_output, write_json, write_result
from longmem.loading import load_model_and_tokenizer, resolve_device

# lm-evaluation-harness is optional (`pip install 'longmem[eval]'`) and takes seconds to import (datasets, pandas):
# ``longmem.eval.harness`` is loaded by name when `eval harness` runs, not by every `longmem` command. This is the
# package's one import by name (tests/test_layering.py allows exactly this one).
HARNESS_MODULE = "longmem.eval.harness"


def load_harness():
    """The harness module, or one line saying how to install lm-evaluation-harness."""
    try:
        return importlib.import_module(HARNESS_MODULE)
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("lm_eval"):
            raise
        raise LongMemError("longmem eval harness needs lm-evaluation-harness; install it with pip install 'longmem[eval]'") from None


def warn(msg: str) -> None:
    print(f"longmem eval: warning: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------- declarations and shared options

Option = tuple[tuple[str, ...], dict]  # add_argument's (flags, keyword arguments)


def option(*flags: str, **kwargs) -> Option:
    return flags, kwargs


@dataclass(frozen=True)
class Task:
    """One ``longmem eval`` command."""

    name: str
    help: str  # its line in ``longmem eval --help``
    description: str
    options: tuple[Option, ...]  # its own and the shared ones, in the order --help lists them
    run: Callable  # args -> exit status
    epilog: str | None = None


MODEL_DEFAULT = "(default: the shipped default, longmem-tiny; or a shipped model's name, e.g. smollm2-135m-longmem)"


def model_options(several: bool = False) -> tuple[Option, ...]:
    """``--model`` (one checkpoint, or several to compare), ``--device``, ``--dtype``."""
    if several:
        model = option("--model", action="extend", nargs="+", metavar="DIR",
                       help=f"LongMem checkpoint folder(s) to compare; repeat or list several {MODEL_DEFAULT}")
    else:
        model = option("--model", metavar="DIR", help=f"LongMem checkpoint folder {MODEL_DEFAULT}")
    return (model,
            option("--device", help="cpu or cuda (default: cuda when available, else cpu)"),
            option("--dtype", choices=["fp32", "bf16", "fp16"], help="weights' type after loading (default: as stored; "
                                                                     "bf16 halves the memory of a real backbone)"))


def memory_options(chunk_default: str = "the model's") -> tuple[Option, ...]:
    """The memory's sizes at evaluation, each the model's unless given (see ``memory_args``)."""
    return (option("--memory-size", type=int, metavar="M", help="memory tokens per row at evaluation (default: the model's)"),
            option("--chunk-size", type=int, metavar="CSZ", help=f"tokens per memory chunk (default: {chunk_default})"),
            option("--topk-chunks", type=int, metavar="KC", help="chunks retrieved per query and head (default: the model's)"))


def output_options(plot: str) -> tuple[Option, ...]:
    """``--json``, ``--plot`` (drawing ``plot``), ``--no-progress``."""
    return (option("--json", metavar="OUT", help="also write the results to this JSON file"),
            option("--plot", metavar="OUT.png", help=f"also draw {plot}"),
            option("--no-progress", dest="progress", action="store_false", help="no progress bars"))


def memory_args(args) -> dict:
    """``--memory-size/--chunk-size/--topk-chunks`` as ``new_memory`` keyword arguments (only those given)."""
    return {k: getattr(args, k) for k in ("memory_size", "chunk_size", "topk_chunks") if getattr(args, k, None) is not None}


def memory_settings(model, args) -> dict:
    """The memory sizes given (``memory_args``) as ``model``'s config takes them: LongMemConfig checks them against
    the model's own (e.g. a size that is not a multiple of the chunk) and raises a one-line LongMemError."""
    given = memory_args(args)
    config = model.config.replace(**given)
    return {k: getattr(config, k) for k in given}


def at_least(value: int | None, flag: str, low: int = 1) -> int | None:
    """``value`` of ``flag`` (None: not given), when it is >= ``low`` (a 0 or a negative count would slice the wrong
    examples)."""
    if value is not None and value < low:
        raise LongMemError(f"{flag} must be at least {low}, got {value}")
    return value


# --------------------------------------------------------------------------- ppl


def _run_ppl(args) -> int:
    max_tokens = at_least(args.max_tokens, "--max-tokens", 2)
    batch_size = at_least(args.batch_size, "--batch-size")
    check_output(args.json)
    check_output(args.plot, "--plot")
    report = run_ppl(args.model or [], args.data, baselines=args.baseline or [], max_tokens=max_tokens,
                     batch_size=batch_size, memory_kwargs=memory_args(args), device=resolve_device(args.device),
                     progress=args.progress, warn=warn)
    print(format_ppl(report))
    if args.json:
        write_result(args.json, report)
    if args.plot:
        buckets = [bucket_name(*b) for b in BUCKETS]
        lines = {k: [v["ppl_by_position"][b] for b in buckets] for k, v in report.items() if k != "meta"}
        plot_lines(args.plot, buckets, lines, "position in document (local windows)", "token perplexity",
                    "Perplexity by position")
    return 0


PPL = Task(
    "ppl", help="long-context perplexity with and without memory",
    description="Stream each document in local windows of the model's segment length, memory reset per document, and "
                "report token perplexity overall, beyond the first window, by position (0-1, 1-4, 4-16, 16+ windows) "
                "and by document length (<5K, 5K-10K, 10K-100K, 100K-500K, 500K-1M, >1M tokens; empty splits "
                "omitted). Documents not longer than one window are skipped with a warning.",
    epilog="--json layout: {\"longmem\": S, \"no_memory\": S, \"backbone\": S, \"baseline:NAME\": S, \"meta\": {...}} "
           "for one model; with several --model the keys are \"<model name>/<mode>\" (model name = the checkpoint "
           "folder's name). S holds ppl, ppl_beyond_window, loss, tokens, tokens_beyond_window, ppl_by_position, "
           "tokens_by_position and by_length.",
    options=(
        option("--data", nargs="+", required=True, metavar="PATH",
               help="documents: text files, folders, .jsonl files ({\"text\": ...} per line) or hf:NAME[:SPLIT]"),
        *model_options(several=True),
        option("--baseline", action="append", metavar="DIR",
               help="a plain HF causal LM folder (with the same tokenizer) scored on the same windows; repeatable"),
        option("--max-tokens", type=int, metavar="N", help="read at most the first N tokens of each document (default: all)"),
        option("--batch-size", type=int, default=1, metavar="B", help="documents streamed side by side (default: 1)"),
        *memory_options(),
        *output_options("perplexity by position bucket, one line per model and mode"),
    ),
    run=_run_ppl)


# --------------------------------------------------------------------------- chapterbreak


def _run_chapterbreak(args) -> int:
    max_examples = at_least(args.max_examples, "--max-examples")
    max_context_tokens = at_least(args.max_context_tokens, "--max-context-tokens")
    check_output(args.json)
    check_output(args.plot, "--plot")
    examples = load_chapterbreak(args.data, args.split)
    if max_examples:
        examples = examples[:max_examples]
    model, tok = load_model_and_tokenizer(args.model, resolve_device(args.device), args.dtype)
    report = evaluate_chapterbreak(model, tok, examples, memory_kwargs=memory_settings(model, args),
                                   max_candidate_tokens=args.max_candidate_tokens, max_context_tokens=max_context_tokens,
                                   progress=args.progress)
    report["meta"] = {"data": str(args.data), "split": args.split, "model": str(args.model or "(shipped default)"),
                      "segment_length": model.segment_length}
    print(f"ChapterBreak {args.split}: {report['longmem']['examples']} examples, chance {report['longmem']['chance']:.3f}")
    print(f"{'mode':<12}{'acc (sum logp)':>16}{'acc (mean logp)':>17}")
    for mode in MODES:
        r = report[mode]
        print(f"{mode:<12}{r['accuracy_sum']:>16.3f}{r['accuracy_mean']:>17.3f}"
              + "".join(f"   {s}: {v['accuracy_sum']:.3f}/{v['accuracy_mean']:.3f}" for s, v in r["by_split"].items()))
    if args.json:
        write_result(args.json, report)
    if args.plot:
        plot_bars(args.plot, list(MODES), {"sum log-prob": [report[m]["accuracy_sum"] for m in MODES],
                                            "mean log-prob": [report[m]["accuracy_mean"] for m in MODES]},
                   None, "accuracy", f"ChapterBreak ({args.split})", hline=report["longmem"]["chance"])
    return 0


CHAPTERBREAK = Task(
    "chapterbreak", help="ChapterBreak: pick the true next-chapter beginning among six",
    description="Read each prefix into memory segment by segment (its last local window stays as context), score the "
                "candidate beginnings by their log-probability after it (summed and per-token mean; candidates are "
                "never written to memory) and report the accuracy of picking the true one, against chance (1/number "
                "of candidates).",
    options=(
        option("--data", required=True, metavar="FILE.json",
               help='ChapterBreak JSON: {"pg19": {work: [{"ctx", "pos", "negs"}]}, "ao3": {...}}'),
        option("--split", default="all", metavar="SPLIT", help="ao3, pg19 or all (default: all)"),
        option("--max-examples", type=int, metavar="N", help="evaluate only the first N examples"),
        option("--max-candidate-tokens", type=int, metavar="C", help="cut candidates to C tokens (default: half the local window)"),
        option("--max-context-tokens", type=int, metavar="N", help="keep only the last N prefix tokens (default: all)"),
        *model_options(),
        *memory_options(),
        *output_options("a bar chart of accuracy by mode"),
    ),
    run=_run_chapterbreak)


def _run_build(args) -> int:
    if args.split not in ("ao3", "pg19"):
        raise LongMemError(f"unknown split {args.split!r}; choose ao3 or pg19")
    negatives = at_least(args.negatives, "--negatives")
    context_chars = at_least(args.context_chars, "--context-chars")
    candidate_words = at_least(args.candidate_words, "--candidate-words")
    max_examples = at_least(args.max_examples, "--max-examples")
    check_output(args.out, "--out")
    book_id, text = read_book(args.book, args.id, args.data_root)
    examples = build_examples(text, negatives=negatives, context_chars=context_chars, candidate_words=candidate_words,
                              seed=args.seed)
    if max_examples:
        examples = examples[:max_examples]
    out = {"pg19": {}, "ao3": {}}
    out[args.split][book_id] = examples
    write_json(args.out, out)
    print(f"{len(examples)} ChapterBreak examples from {book_id} -> {args.out} (split {args.split})")
    return 0


CHAPTERBREAK_BUILD = Task(
    "chapterbreak-build", help="write ChapterBreak-format examples from a book with chapter headings",
    description="For each chapter boundary with enough later chapters: ctx = the book before the heading (last "
                "--context-chars characters), pos = the first --candidate-words words of the next chapter, negs = the "
                "beginnings of --negatives chapters drawn from later in the book. Headings ('CHAPTER I', 'Chapter 1', "
                "...) and volume lines are left out of candidates. Deterministic for a --seed.",
    options=(
        option("--book", required=True, metavar="SRC",
               help="austen:TITLE (from DATA_ROOT/books/*.jsonl, e.g. austen:Emma), a .jsonl (with --id) or a text file"),
        option("--out", required=True, metavar="FILE.json", help="where to write the examples"),
        option("--id", help="document id inside a .jsonl --book"),
        option("--data-root", default="data", metavar="DIR", help="folder written by `longmem data` (default: data)"),
        option("--split", default="pg19", metavar="SPLIT", help="split to file the examples under: pg19 or ao3 (default: pg19)"),
        option("--negatives", type=int, default=5, metavar="N", help="negative candidates per example (default: 5)"),
        option("--context-chars", type=int, default=40000, metavar="N", help="characters of prefix kept (default: 40000)"),
        option("--candidate-words", type=int, default=150, metavar="K", help="words per candidate beginning (default: 150)"),
        option("--max-examples", type=int, metavar="N", help="keep only the first N examples"),
        option("--seed", type=int, default=0, metavar="S", help="seed for drawing the negatives (default: 0)"),
    ),
    run=_run_build)


# --------------------------------------------------------------------------- icl


def _run_icl(args) -> int:
    task = get_task(args.task)
    max_test = at_least(args.max_test, "--max-test")
    check_output(args.json)
    check_output(args.plot, "--plot")
    test = load_examples(args.data, task)
    pool = load_examples(args.train, task)
    if max_test:
        test = test[:max_test]
    model, tok = load_model_and_tokenizer(args.model, resolve_device(args.device), args.dtype)
    report = evaluate_icl(model, tok, task, test, pool, k=args.k, memory_demos=args.memory_demos, seeds=args.seeds,
                          seed=args.seed, memory_kwargs=memory_settings(model, args), progress=args.progress, warn=warn)
    report["meta"] = {"data": str(args.data), "train": str(args.train), "model": str(args.model or "(shipped default)")}
    print(f"ICL {task.name}: {len(test)} test examples, k={args.k} local + {report['memory_demos']} in memory, "
          f"{args.seeds} seeds, chance {report['chance']:.3f}")
    print(f"{'mode':<12}{'greedy':>18}{'likelihood':>18}{'local demos':>13}")
    for mode in MODES:
        r = report[mode]
        g, lk = r["accuracy_greedy"], r["accuracy_likelihood"]
        print(f"{mode:<12}{g['mean']:>11.3f} ± {g['std']:.3f}{lk['mean']:>11.3f} ± {lk['std']:.3f}{r['local_demos']:>13.1f}")
    if args.json:
        write_result(args.json, report)
    if args.plot:
        plot_bars(args.plot, list(MODES),
                   {"greedy": [report[m]["accuracy_greedy"]["mean"] for m in MODES],
                    "likelihood": [report[m]["accuracy_likelihood"]["mean"] for m in MODES]},
                   {"greedy": [report[m]["accuracy_greedy"]["std"] for m in MODES],
                    "likelihood": [report[m]["accuracy_likelihood"]["std"] for m in MODES]},
                   "accuracy", f"In-context learning: {task.name}", hline=report["chance"])
    return 0


ICL = Task(
    "icl", help="memory-augmented in-context learning (SST-2, MR, Subj, SST-5, MPQA)",
    description="The paper's protocol: k demonstrations in the local window and N more written into memory (chunk "
                "size 2), templates 'Review: {x} Sentiment: {y}. ' (Subj: 'Input: {x} Type: {y}. '), label words "
                "positive/negative (sst2, mr, mpqa; 1 = positive), terrible/bad/okay/good/great (sst5), "
                "subjective/objective (subj; 0 = subjective). Test prompts are never written to memory. Accuracy by "
                "the greedy-prefix rule and by label-word likelihood, mean and std over seeds.",
    epilog="--memory-size defaults to the model's, enlarged to hold all memory demonstrations.",
    options=(
        option("--task", required=True, metavar="TASK", help="sst2, mr, subj, sst5 or mpqa"),
        option("--data", required=True, metavar="TEST",
               help="test examples: .tsv (sentence<TAB>label, with header), .csv (label,text), .jsonl ({text, label}) "
                    "or hf:NAME[:SPLIT]"),
        option("--train", required=True, metavar="POOL", help="demonstration pool, same formats as --data"),
        option("--k", type=int, default=20, help="demonstrations in the local context (default: 20)"),
        option("--memory-demos", type=int, default=2000, metavar="N",
               help="demonstrations written into memory (default: 2000; a smaller pool is used whole, with a warning)"),
        option("--seeds", type=int, default=6, metavar="N", help="number of seeds, i.e. demonstration samples (default: 6)"),
        option("--seed", type=int, default=1, metavar="S", help="first seed; seeds S..S+N-1 (default: 1, as the release)"),
        option("--max-test", type=int, metavar="N", help="evaluate only the first N test examples"),
        *model_options(),
        *memory_options(chunk_default="2"),
        *output_options("a bar chart of accuracy by mode and rule"),
    ),
    run=_run_icl)


# --------------------------------------------------------------------------- passkey


def _run_passkey(args) -> int:
    check_output(args.json)
    check_output(args.plot, "--plot")
    model, tok = load_model_and_tokenizer(args.model, resolve_device(args.device), args.dtype)
    modes = MODES + ((PASSKEY_FULL,) if args.full_context else ())
    report = evaluate_passkey(model, tok, args.distances, trials=args.trials, seed=args.seed, modes=modes,
                              memory_kwargs=memory_settings(model, args), candidates=args.candidates,
                              max_new_tokens=args.max_new_tokens, progress=args.progress, warn=warn)
    report["meta"] = {"model": str(args.model or "(shipped default)")}
    print(f"pass key: {args.trials} trials per distance, local window {report['segment_length']}, "
          f"memory {report['memory_size']} tokens")
    print(f"accuracy greedy (exact digits) / choice (most likely of {args.candidates} keys); n/a: the prompt does "
          "not fit the backbone's context")

    def cell(r):
        return f"{'n/a':>20}" if r["trials"] == 0 else f"{r['accuracy_greedy']:>13.2f} / {r['accuracy_choice']:.2f}"

    print(f"{'distance':>10}" + "".join(f"{m:>20}" for m in modes))
    for d in args.distances:
        print(f"{d:>10}" + "".join(cell(report[m]["by_distance"][str(d)]) for m in modes))
    if args.json:
        write_result(args.json, report)
    if args.plot:
        xs = [str(d) for d in args.distances]
        lines = {}
        for m in modes:
            lines[f"{m} greedy"] = [report[m]["by_distance"][x]["accuracy_greedy"] for x in xs]
            lines[f"{m} choice"] = [report[m]["by_distance"][x]["accuracy_choice"] for x in xs]
        plot_lines(args.plot, xs, lines, "distance of the key (tokens)", "accuracy", "Pass-key retrieval",
                    hline=report["chance_choice"], dashed="choice")
    return 0


PASSKEY = Task(
    "passkey", help="pass-key retrieval: recall a 5-digit key from beyond the local window",
    description="Hide a 5-digit key early in filler text ('The grass is green. ...') and ask for it at the end ('What "
                "is the pass key? The pass key is'). Accuracy by distance: greedy (the generated digits equal the key "
                "exactly) and choice (the key is the most likely of --candidates 5-digit numbers).",
    options=(
        option("--distances", type=int, nargs="+", default=[1000, 4000, 16000], metavar="D",
               help="tokens between the key and the question (default: 1000 4000 16000)"),
        option("--trials", type=int, default=10, metavar="N", help="keys tried per distance (default: 10)"),
        option("--candidates", type=int, default=10, metavar="N",
               help="keys compared by the choice rule, the true one included (default: 10)"),
        option("--max-new-tokens", type=int, default=8, metavar="N", help="tokens generated for the greedy answer (default: 8)"),
        option("--seed", type=int, default=0, metavar="S", help="seed for keys and lead-ins (default: 0)"),
        option("--full-context", action="store_true",
               help="also run the backbone with the whole prompt in its own context, where it fits (backbone_full)"),
        *model_options(),
        *memory_options(),
        *output_options("accuracy by distance, one line per mode and rule"),
    ),
    run=_run_passkey)


# --------------------------------------------------------------------------- facts


def _run_facts(args) -> int:
    check_output(args.json)
    check_output(args.plot, "--plot")
    if args.text:
        name, text = args.text, read_text_file(args.text)
    else:
        name, text = "Emma (the books corpus's test novel)", emma_text()
    model, tok = load_model_and_tokenizer(args.model, resolve_device(args.device), args.dtype)
    report = evaluate_facts(model, tok, text, tokens=args.tokens)
    report["meta"] = {"model": str(args.model or "(shipped default)"), "document": name}
    print(f"planted facts: {report['of']} facts in the first {report['document_tokens']} tokens of {name}, asked at its end "
          f"(local window {report['segment_length']})")
    for row in report["facts"]:
        print(f"  {row['fact']}  ({row['distance']} tokens back)")
        for m in report["modes"]:
            print(f"    {m:<10} {'right' if row[m]['right'] else 'wrong':<6} {row[m]['generated']!r}")
    print("right: " + ", ".join(f"{m} {report[m]}/{report['of']}" for m in report["modes"]))
    if args.json:
        write_result(args.json, report)
    if args.plot:
        plot_bars(args.plot, report["modes"], {"facts recalled": [report[m] for m in report["modes"]]}, None,
                  "facts recalled", f"Planted facts ({report['of']})")
    return 0


FACTS = Task(
    "facts", help="made-up facts planted in a long held-out text, asked for at its end",
    description="Plant five made-up facts (wordings no training example uses) at evenly spaced depths of the first "
                "--tokens tokens of a text (default: Emma, the books corpus's test novel, from Debian's "
                "r-cran-janeaustenr), then ask for each at the end; greedy answers with memory, without (same "
                "weights) and from the backbone alone.",
    options=(
        option("--text", metavar="FILE", help="a UTF-8 text file to plant the facts in (default: Emma)"),
        option("--tokens", type=int, default=16000, metavar="N", help="tokens of the text to use (default: 16000)"),
        *model_options(),
        *output_options("facts recalled by mode"),
    ),
    run=_run_facts)


# --------------------------------------------------------------------------- names


def _run_names(args) -> int:
    if not 0 < args.memory_frac < 1:
        raise LongMemError(f"--memory-frac must be between 0 and 1 (the share of each document put in memory), got {args.memory_frac}")
    context_chars = at_least(args.context_chars, "--context-chars")
    min_chars = at_least(args.min_chars, "--min-chars")
    new_tokens = at_least(args.new_tokens, "--new-tokens")
    check_output(args.json)
    check_output(args.plot, "--plot")
    docs = [d for path in args.data for d in iter_documents(path)]
    if not docs:
        raise LongMemError(f"no documents in {' '.join(args.data)}; give text files, folders or .jsonl files")
    model, tok = load_model_and_tokenizer(args.model, resolve_device(args.device), args.dtype)
    report = names_report(model, tok, docs, memory_frac=args.memory_frac, context_chars=context_chars,
                          min_chars=min_chars, new_tokens=new_tokens, memory_kwargs=memory_settings(model, args),
                          progress=args.progress)
    report["meta"] = {"model": str(args.model or "(shipped default)"), **report["meta"]}
    per_doc, total = report["documents"], report["all"]
    print(f"names defined in the first {args.memory_frac:.0%} of each document (in memory), completed at their first use "
          f"after it from their first token (greedy, {context_chars} characters of prompt)")
    print(f"{'document':<44}{'names':>7}{'with memory':>13}{'without':>9}{'only with':>11}{'only without':>14}")
    for name, r in [*per_doc.items(), ("all", total)]:
        print(f"{name[-44:]:<44}{r['probes']:>7}{r['right_memory']:>13}{r['right_no_memory']:>9}"
              f"{r['only_with_memory']:>11}{r['only_without_memory']:>14}")
    if args.json:
        write_result(args.json, report)
    if args.plot:
        groups = [k for k, r in per_doc.items() if r["probes"]] + ["all"]
        rows = [per_doc[k] for k in groups[:-1]] + [total]
        series = {label: [r[key] / max(1, r["probes"]) for r in rows]
                  for label, key in (("with memory", "right_memory"), ("without memory", "right_no_memory"))}
        labels = [f"{Path(g).name[-18:]} ({r['probes']})" for g, r in zip(groups, rows)]
        plot_bars(args.plot, labels, series, None, "share of names completed exactly (names probed)",
                   "Names defined far back, completed from memory")
    return 0


NAMES = Task(
    "names", help="recall of names defined far back in code: completed with and without memory",
    description="For each document: its first --memory-frac (cut at a line start) goes into a fresh memory; every name "
                "that part defines (def NAME, class NAME, NAME =, self.NAME =) and the rest uses is cued at its first "
                "use there, with the --context-chars characters before it (which must not contain it) and the name's "
                "first token; greedy generation with the memory and without. A name counts when the rest of it comes "
                "back exactly. Nothing is picked by hand (longmem.eval.recall).",
    epilog="--json layout: {\"all\": C, \"documents\": {ID: C + memory_tokens, context_chars, rows}, \"meta\": {...}}; "
           "C holds probes, right_memory, right_no_memory, only_with_memory, only_without_memory; each row the name, "
           "its cue and both continuations.",
    options=(
        option("--data", nargs="+", required=True, metavar="PATH",
               help="code documents: text files, folders, .jsonl files ({\"text\": ...} per line) or hf:NAME[:SPLIT]"),
        option("--memory-frac", type=float, default=0.5, metavar="F", help="share of each document put in memory (default: 0.5)"),
        option("--context-chars", type=int, default=600, metavar="N", help="characters of prompt before each use (default: 600)"),
        option("--min-chars", type=int, default=6, metavar="N", help="shortest name probed (default: 6)"),
        option("--new-tokens", type=int, default=8, metavar="N", help="tokens generated per probe (default: 8)"),
        *model_options(),
        *memory_options(),
        *output_options("a bar chart of names completed with and without memory, per document"),
    ),
    run=_run_names)


# --------------------------------------------------------------------------- harness


def _limit(text: str):
    try:
        value = float(text)
    except ValueError:
        raise LongMemError(f"--limit must be a number of examples or a fraction, got {text!r}") from None
    if value <= 0:
        raise LongMemError(f"--limit must be positive, got {text}")
    return int(value) if value >= 1 and value == int(value) else value


def _metadata(text: str | None) -> dict | None:
    try:
        metadata = json.loads(text) if text else None
    except json.JSONDecodeError as e:
        raise LongMemError(f"--metadata is not valid JSON ({e.msg}); give e.g. '{{\"max_seq_lengths\": [4096]}}'") from None
    if metadata is not None and not isinstance(metadata, dict):
        raise LongMemError("--metadata must be a JSON object, e.g. '{\"max_seq_lengths\": [4096]}'")
    return metadata


def _run_harness(args) -> int:
    harness = load_harness()
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise LongMemError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    for path in args.include_path or []:
        if not Path(path).is_dir():
            raise LongMemError(f"--include-path {path} is not a folder of task YAML files")
    check_output(args.output, "--output")
    if not args.progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tasks = [t for spec in args.tasks for t in spec.split(",") if t]
    metadata = _metadata(args.metadata)
    report = harness.evaluate_harness(tasks, harness.parse_model_args(args.model_args), args.memory,
                                      include_path=args.include_path, num_fewshot=args.num_fewshot,
                                      limit=None if args.limit is None else _limit(args.limit), metadata=metadata,
                                      progress=args.progress)
    print(harness.format_results(report))
    if args.output:
        write_result(args.output, report)
    return 0


HARNESS = Task(
    "harness", help="any lm-evaluation-harness task, in the three memory modes",
    description="Run lm-evaluation-harness tasks (lm_eval.simple_evaluate) on a LongMem checkpoint in each memory "
                "mode: on (LongMem reading its memory), off (same weights, local window only), backbone (the frozen "
                "LM alone). A context longer than the local window is split: its earlier part is written into a fresh "
                "memory, window by window, and the continuation is scored in the last window; few-shot demonstrations "
                "that overflow the window thus go to memory. Needs pip install 'longmem[eval]'.",
    epilog="--output layout: {\"modes\": {MEMORY: the harness's results (results, configs, versions, n-shot, ...)}, "
           "\"meta\": {...}}. Model arguments: pretrained=DIR, memory=on|off|backbone, memory_size=, chunk_size=, "
           "topk_chunks=, device=, dtype=, batch_size=, prefix_cache= (see longmem.eval.harness).",
    options=(
        option("--tasks", nargs="+", required=True, metavar="TASK",
               help="harness task or group names (space or comma separated), or task YAML files"),
        option("--model-args", default="", metavar="K=V,...",
               help="model arguments, e.g. pretrained=models/longmem-tiny,memory_size=65536 (default: the shipped "
                    "model); memory=on|off|backbone runs that mode only"),
        option("--memory", nargs="+", choices=["on", "off", "backbone"], default=["on", "off", "backbone"],
               help="memory modes to run (default: all three)"),
        option("--include-path", action="append", metavar="DIR", help="a folder of your own task YAMLs; repeatable"),
        option("--num-fewshot", type=int, metavar="N", help="few-shot demonstrations per example (default: the task's)"),
        option("--limit", metavar="N", help="evaluate only the first N examples of each task (or a fraction)"),
        option("--metadata", metavar="JSON", help="task metadata, as the harness's --metadata (e.g. RULER's "
               "'{\"max_seq_lengths\": [4096]}'); the tokenizer folder is passed as \"tokenizer\""),
        option("--output", metavar="OUT.json", help="also write the results to this JSON file"),
        option("--no-progress", dest="progress", action="store_false", help="no progress bars or harness logs"),
    ),
    run=_run_harness)


# --------------------------------------------------------------------------- parser

TASKS = (PPL, CHAPTERBREAK, CHAPTERBREAK_BUILD, ICL, PASSKEY, FACTS, NAMES, HARNESS)  # in this order in --help


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a LongMem checkpoint (perplexity, ChapterBreak, ICL, pass key, names)",
                       description="The paper's evaluations. Each compares three modes of one checkpoint on the same "
                                   "tokens: longmem (SideNet reading its memory), no_memory (same weights, memory off) "
                                   "and backbone (the frozen LM alone).")
    ev = p.add_subparsers(dest="eval_command", metavar="TASK")
    ev.required = True
    for task in TASKS:
        q = ev.add_parser(task.name, help=task.help, description=task.description, epilog=task.epilog)
        for flags, kwargs in task.options:
            q.add_argument(*flags, **kwargs)
        q.set_defaults(func=task.run)
