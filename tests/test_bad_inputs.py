"""Bad inputs to every command and to the public API: one table; one line each; nothing on disk changed.

Every ``longmem`` subcommand (read from the real parser, so a new command without a case fails
``test_every_subcommand_has_a_case``) and the public API are given what a user can get wrong: empty,
binary and non-UTF-8 files, missing paths, enormous, zero or negative sizes, malformed arguments,
unknown hub ids offline, out-of-range token ids, memories and checkpoints of another model, memory
names with path tricks. Each case checks that

- the exit status is 2;
- stderr is one line, ``longmem CMD: error: ...``, holding the case's ``expect`` text (what was wrong
  and, in most messages, what to do). argparse's own usage errors (kind ``usage``: a malformed or
  missing argument) are the one documented exception: argparse's usage block, then one error line;
- no traceback is printed, on stdout or stderr;
- nothing already on disk changed and nothing was left behind: every file and folder under the
  inputs, the memory store ($LONGMEM_HOME), the output folder and the model folders has the same
  sha256 and mtime afterwards, and no file or folder appeared.

API cases check the same of ``LongMemError`` (one line, ``expect`` in it). Most CLI cases run
in-process through ``longmem.cli.main``; ``sub`` cases run ``python -m longmem.cli`` in a fresh
process (with a timeout: an enormous argument that is not refused fails the case instead of hanging
it) to show that only the one line reaches the real terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch

from conftest import make_llama
from longmem import LongMem, LongMemError, MemoryBank, load_model
from longmem.cli import build_parser, main
from longmem.io import verify_result, write_result

FIXTURES = Path(__file__).parent / "fixtures"
HUGE = str(10**12)
NO_SUCH_HUB_ID = "no-such-org/no-such-model-404"


# --------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    expect: str  # text the error line must hold
    argv: list[str] | None = None  # CLI: {placeholders} filled from the world (see `world`)
    call: Callable | None = None  # API: call(world) must raise LongMemError
    kind: str = "error"  # "error": one line; "usage": argparse's usage block + one error line
    sub: bool = False  # run in a fresh process


def cli(id, expect, *argv, kind="error", sub=False):
    return Case(id, expect, argv=list(argv), kind=kind, sub=sub)


def api(id, expect, call):
    return Case(id, expect, call=call)


M = ("--model", "{ckpt}")  # the tiny LongMem checkpoint
TRAIN = ("train", "--backbone", "{backbone}", "--out", "{out}/run", "--no-progress", "--max-steps", "1", "--batch-size", "1",
         "--segment-length", "16", "--memory-size", "64", "--chunk-size", "2", "--topk-chunks", "2")
PRETRAIN = ("pretrain", "--tokenizer", "{tok}", "--out", "{out}/run", "--layers", "1", "--hidden", "16", "--heads", "2",
            "--kv-heads", "1", "--intermediate", "32", "--seq-len", "16", "--max-position", "32", "--max-steps", "1",
            "--batch-size", "1", "--eval-every", "1", "--eval-tokens", "64", "--precision", "fp32", "--no-progress")
PPL = ("eval", "ppl", *M, "--device", "cpu", "--no-progress", "--json", "{out}/ppl.json", "--plot", "{out}/ppl.png")
CB = ("eval", "chapterbreak", *M, "--device", "cpu", "--no-progress", "--json", "{out}/cb.json")
BUILD = ("eval", "chapterbreak-build", "--out", "{out}/cb.json")
ICL = ("eval", "icl", "--task", "sst2", *M, "--device", "cpu", "--no-progress", "--json", "{out}/icl.json", "--seeds", "1")
PK = ("eval", "passkey", *M, "--device", "cpu", "--no-progress", "--json", "{out}/pk.json", "--trials", "1")
NAMES = ("eval", "names", *M, "--device", "cpu", "--no-progress", "--json", "{out}/names.json")
HARNESS = ("eval", "harness", "--tasks", "no_such_task", "--no-progress")
GEN = ("generate", *M, "--prompt", "alpha beta")
CHAT = ("chat", *M)
ADD = ("memory", "add")

CASES = [
    # -- data / tokenizer ----------------------------------------------------------------------
    cli("data-unknown-corpus", "invalid choice", "data", "novels", kind="usage"),
    cli("data-min-bytes-not-a-number", "invalid int value", "data", "code", "--min-bytes", "lots", kind="usage"),
    cli("data-stdlib-missing", "is not a folder", "data", "code", "--stdlib", "{missing}", "--out", "{out}/data"),
    cli("data-stdlib-is-a-file", "is not a folder", "data", "code", "--stdlib", "{text}", "--out", "{out}/data"),
    cli("data-stdlib-empty-folder", "no .py files", "data", "code", "--stdlib", "{folder}", "--out", "{out}/data"),
    cli("data-min-bytes-enormous", f"no .py files of {HUGE} bytes", "data", "code", "--min-bytes", HUGE, "--out", "{out}/data"),
    cli("data-austen-dir-missing", "Rdata.rdx is missing", "data", "books", "--austen-dir", "{missing}", "--out", "{out}/data"),
    cli("data-austen-dir-garbage", "could not decode the R data", "data", "books", "--austen-dir", "{rdata}", "--out", "{out}/data"),
    cli("data-all-austen-dir-missing", "Rdata.rdx is missing", "data", "all", "--austen-dir", "{missing}", "--out", "{out}/data"),
    cli("data-recall-missing-input", "is not a file", "data", "recall", "{missing}", "--out", "{out}/r.jsonl"),
    cli("data-recall-not-jsonl", "is not a JSON object with a 'text' field", "data", "recall", "{text}", "--out", "{out}/r.jsonl"),
    cli("data-recall-dense-short-documents", "no document longer than 4,000 characters", "data", "recall", "{short_jsonl}",
        "--dense", "3", "--out", "{out}/r.jsonl"),
    cli("data-recall-piece-chars-zero", "must be >= 1", "data", "recall", "{missing}", "--piece-chars", "0", "--out", "{out}/r.jsonl"),
    cli("data-pycode-missing-package", "is not installed", "data", "pycode", "--packages", "no_such_package_xyz",
        "--out", "{out}/p.jsonl"),
    cli("tokenizer-empty-file", "no text in", "tokenizer", "--data", "{empty}", "--out", "{out}/tok"),
    cli("tokenizer-binary-file", "looks binary", "tokenizer", "--data", "{binary}", "--out", "{out}/tok"),
    cli("tokenizer-missing-file", "does not exist", "tokenizer", "--data", "{missing}", "--out", "{out}/tok"),
    cli("tokenizer-vocab-zero", "--vocab-size 0 is too small", "tokenizer", "--data", "{text}", "--vocab-size", "0", "--out", "{out}/tok"),
    cli("tokenizer-vocab-enormous", "--vocab-size", "tokenizer", "--data", "{text}", "--vocab-size", str(10**20), "--out", "{out}/tok"),
    cli("tokenizer-out-is-a-file", "is not a folder", "tokenizer", "--data", "{text}", "--vocab-size", "300", "--out", "{text}"),
    cli("tokenizer-no-out", "--out", "tokenizer", "--data", "{text}", kind="usage"),
    # -- pretrain / export-backbone / perplexity -----------------------------------------------
    cli("pretrain-empty-data", "fewer than one training sequence", *PRETRAIN, "--data", "{empty}"),
    cli("pretrain-binary-data", "looks binary", *PRETRAIN, "--data", "{binary}"),
    cli("pretrain-missing-tokenizer", "tokenizer folder", *PRETRAIN, "--data", "{text}", "--tokenizer", "{missing}"),
    cli("pretrain-seq-len-enormous", "exceeds max positions", *PRETRAIN, "--data", "{text}", "--seq-len", HUGE),
    cli("pretrain-batch-size-enormous", "is more than the training data holds", *PRETRAIN, "--data", "{text}", "--batch-size", HUGE),
    cli("pretrain-weights-count", "--weights has 2 values for 1 --data sets", *PRETRAIN, "--data", "{text}", "--weights", "1", "2"),
    cli("pretrain-weights-negative", "--weights must be finite, >= 0", *PRETRAIN, "--data", "{text}", "--weights", "-1"),
    cli("pretrain-device-unknown", "--device must be auto, cpu, cuda", *PRETRAIN, "--data", "{text}", "--device", "quantum"),
    cli("pretrain-layers-zero", "--layers must be >= 1", *PRETRAIN, "--data", "{text}", "--layers", "0"),
    cli("pretrain-empty-validation", "fewer than one window", *PRETRAIN, "--data", "{text}", "--val-data", "{empty}"),
    cli("pretrain-out-holds-a-run", "already holds a checkpoint", *PRETRAIN, "--data", "{text}", "--out", "{runs}/pretrain"),
    cli("pretrain-lr-not-a-number", "invalid float value", *PRETRAIN, "--data", "{text}", "--lr", "fast", kind="usage"),
    cli("export-missing-run", "does not exist", "export-backbone", "--run", "{missing}", "--out", "{out}/bb"),
    cli("export-damaged-state", "is damaged", "export-backbone", "--run", "{runs}/pretrain", "--out", "{out}/bb"),
    cli("export-empty-state", "is damaged", "export-backbone", "--run", "{runs}/pretrain-empty", "--out", "{out}/bb"),
    cli("export-no-out", "--out", "export-backbone", "--run", "{runs}/pretrain", kind="usage"),
    cli("perplexity-missing-model", "does not exist", "perplexity", "--model", "{missing}", "--data", "{text}", "--json", "{out}/p.json"),
    cli("perplexity-empty-data", "fewer than one window", "perplexity", "--model", "{backbone}", "--data", "{empty}", "--json", "{out}/p.json"),
    cli("perplexity-binary-data", "looks binary", "perplexity", "--model", "{backbone}", "--data", "{binary}", "--json", "{out}/p.json"),
    cli("perplexity-seq-len-zero", "--seq-len must be at least 1", "perplexity", "--model", "{backbone}", "--data", "{text}", "--seq-len", "0",
        "--json", "{out}/p.json"),
    cli("perplexity-seq-len-enormous", "fewer than one window", "perplexity", "--model", "{backbone}", "--data", "{text}", "--seq-len", HUGE,
        "--json", "{out}/p.json"),
    cli("perplexity-precision-unknown", "invalid choice", "perplexity", "--model", "{backbone}", "--data", "{text}", "--precision", "fp8",
        kind="usage"),
    # -- train ---------------------------------------------------------------------------------
    cli("train-empty-data", "no document with at least 2 tokens", *TRAIN, "--data", "{empty}"),
    cli("train-binary-data", "looks binary", *TRAIN, "--data", "{binary}"),
    cli("train-missing-data", "does not exist", *TRAIN, "--data", "{missing}"),
    cli("train-unknown-hub-id-offline", f"cannot load backbone or tokenizer '{NO_SUCH_HUB_ID}'", *TRAIN, "--data", "{text}",
        "--backbone", NO_SUCH_HUB_ID),
    cli("train-memory-size-zero", "memory_size must be a positive integer, got 0", *TRAIN, "--data", "{text}", "--memory-size", "0"),
    cli("train-memory-size-negative", "memory_size must be a positive integer, got -64", *TRAIN, "--data", "{text}", "--memory-size", "-64"),
    cli("train-segment-length-beyond-context", "longer than the backbone's context (128)", *TRAIN, "--data", "{text}",
        "--segment-length", "100000"),
    cli("train-init-from-another-backbone", "was trained on another backbone", *TRAIN, "--data", "{text}", "--init-from", "{foreign}"),
    cli("train-init-from-backbone-swapped", "was trained on another backbone", *TRAIN, "--data", "{text}", "--init-from", "{swapped}",
        "--backbone", "{swapped}/backbone"),
    cli("train-out-holds-a-run", "already holds a training run", *TRAIN, "--data", "{text}", "--out", "{runs}/trained"),
    cli("train-batch-size-enormous", "more rows than the training data has segments", *TRAIN, "--data", "{text}", "--batch-size", HUGE),
    cli("train-max-steps-zero", "must be positive", *TRAIN, "--data", "{text}", "--max-steps", "0"),
    cli("train-key-retrieval-for-memtrm", "--retrieval-query key is a LongMem SideNet option", *TRAIN, "--data", "{text}",
        "--method", "memtrm", "--retrieval-query", "key"),
    cli("train-precision-unknown", "invalid choice", *TRAIN, "--data", "{text}", "--precision", "fp8", kind="usage"),
    # -- demo ----------------------------------------------------------------------------------
    cli("demo-missing-model", "is not a LongMem checkpoint", "demo", "--model", "{missing}", "--data", "{text}"),
    cli("demo-empty-data", "no document with at least 2 tokens", "demo", *M, "--data", "{empty}", "--no-progress"),
    cli("demo-binary-data", "looks binary", "demo", *M, "--data", "{binary}", "--no-progress"),
    cli("demo-short-data", "not more than one local window", "demo", *M, "--data", "{short}", "--no-progress", "--json", "{out}/d.json"),
    cli("demo-max-tokens-negative", "--max-tokens must be at least 2", "demo", *M, "--data", "{text}", "--max-tokens", "-5",
        "--json", "{out}/d.json"),
    cli("demo-backbone-swapped", "was trained on another backbone", "demo", "--model", "{swapped}", "--data", "{text}"),
    # -- memory add / list / show / remove -------------------------------------------------------
    cli("add-name-parent-dir", "invalid memory name '../x'", *ADD, "../x", "{text}", *M),
    cli("add-name-absolute", "invalid memory name '/tmp/x'", *ADD, "/tmp/x", "{text}", *M),
    cli("add-name-empty", "invalid memory name ''", *ADD, "", "{text}", *M),
    cli("add-name-very-long", "invalid memory name", *ADD, "a" * 65, "{text}", *M),
    cli("add-name-nul", "invalid memory name 'a\\x00b'", *ADD, "a\0b", "{text}", *M),
    cli("add-name-newline", "invalid memory name 'x\\n'", *ADD, "x\n", "{text}", *M),
    cli("add-name-sub", "invalid memory name '../../etc/x'", *ADD, "../../etc/x", "{text}", *M, sub=True),
    cli("add-empty-file", "is empty", *ADD, "fresh", "{empty}", *M),
    cli("add-binary-file", "looks binary", *ADD, "fresh", "{binary}", *M),
    cli("add-missing-file", "is not a file", *ADD, "fresh", "{text}", "{missing}", *M),
    cli("add-folder-as-file", "is not a file", *ADD, "fresh", "{folder}", *M),
    cli("add-memory-size-zero", "memory_size must be a positive integer, got 0", *ADD, "fresh", "{text}", *M, "--memory-size", "0"),
    cli("add-memory-size-negative", "memory_size must be a positive integer, got -4", *ADD, "fresh", "{text}", *M, "--memory-size", "-4"),
    cli("add-chunk-size-not-dividing", "multiple of chunk_size", *ADD, "fresh", "{text}", *M, "--chunk-size", "3"),
    cli("add-nprobe-zero", "nprobe must be a positive integer, got 0", *ADD, "fresh", "{text}", *M, "--index", "ivf", "--nprobe", "0"),
    cli("add-index-unknown", "invalid choice", *ADD, "fresh", "{text}", *M, "--index", "hnsw", kind="usage"),
    cli("add-to-another-models-memory", "belongs to another model", *ADD, "other", "{text}", *M, "--no-progress"),
    cli("add-to-a-damaged-memory", "not a readable LongMem memory file", *ADD, "broken", "{text}", *M, "--no-progress"),
    cli("add-backbone-swapped", "was trained on another backbone", *ADD, "fresh", "{text}", "--model", "{swapped}"),
    cli("add-missing-model", "is not a LongMem checkpoint", *ADD, "fresh", "{text}", "--model", "{missing}"),
    cli("add-unknown-device", "unknown device 'quantum'", *ADD, "fresh", "{text}", *M, "--device", "quantum"),
    cli("add-home-is-a-file", "is not a folder", *ADD, "fresh", "{text}", *M, "--home", "{text}"),
    cli("add-no-files", "the following arguments are required: files", *ADD, "fresh", kind="usage"),
    cli("list-home-is-a-file", "is not a folder", "memory", "list", "--home", "{text}"),
    cli("list-extra-argument", "unrecognized arguments: everything", "memory", "list", "everything", kind="usage"),
    cli("show-name-parent-dir", "invalid memory name", "memory", "show", "../other"),
    cli("show-name-nul", "invalid memory name", "memory", "show", "other\0"),
    cli("show-missing", "no memory named 'nothing'", "memory", "show", "nothing"),
    cli("show-damaged", "is unreadable", "memory", "show", "broken"),
    cli("show-empty-memory-file", "is unreadable", "memory", "show", "empty"),
    cli("remove-name-absolute", "invalid memory name '/etc/passwd'", "memory", "remove", "/etc/passwd"),
    cli("remove-name-parent-dir", "invalid memory name", "memory", "remove", "../memories/mine"),
    cli("remove-name-empty", "invalid memory name ''", "memory", "remove", ""),
    cli("remove-missing", "no memory named 'nothing'", "memory", "remove", "nothing"),
    cli("memory-no-action", "required: ACTION", "memory", kind="usage"),
    # -- generate / chat -----------------------------------------------------------------------
    cli("generate-missing-model", "is not a LongMem checkpoint", "generate", "--model", "{missing}", "--prompt", "x"),
    cli("generate-backbone-swapped", "was trained on another backbone", "generate", "--model", "{swapped}", "--prompt", "x"),
    cli("generate-another-models-memory", "belongs to another model", *GEN, "--memory", "other"),
    cli("generate-damaged-memory", "not a readable LongMem memory file", *GEN, "--memory", "broken"),
    cli("generate-memory-name-parent-dir", "invalid memory name", *GEN, "--memory", "../memories/mine"),
    cli("generate-missing-memory", "no memory named 'nothing'", *GEN, "--memory", "nothing"),
    cli("generate-empty-prompt", "the prompt is empty", "generate", *M, "--prompt", ""),
    cli("generate-max-new-tokens-enormous", "--max-new-tokens", *GEN, "--max-new-tokens", HUGE, sub=True),
    cli("generate-max-new-tokens-negative", "--max-new-tokens", *GEN, "--max-new-tokens", "-1"),
    cli("generate-top-p-zero", "top_p must be in (0, 1]", *GEN, "--top-p", "0", "--temperature", "1"),
    cli("generate-top-k-negative", "top_k must be >= 0", *GEN, "--top-k", "-3"),
    cli("generate-temperature-negative", "--temperature must be >= 0", *GEN, "--temperature", "-0.5"),
    cli("generate-unknown-device", "unknown device 'quantum'", *GEN, "--device", "quantum"),
    cli("generate-max-new-tokens-not-a-number", "invalid int value", *GEN, "--max-new-tokens", "many", kind="usage"),
    cli("generate-no-prompt", "one of the arguments --prompt --prompt-file is required", "generate", *M, kind="usage"),
    cli("generate-prompt-and-prompt-file", "not allowed with argument", *GEN, "--prompt-file", "{text}", kind="usage"),
    cli("generate-prompt-file-missing", "cannot read --prompt-file", "generate", *M, "--prompt-file", "{missing}"),
    cli("generate-prompt-file-binary", "is not UTF-8 text", "generate", *M, "--prompt-file", "{binary}"),
    cli("chat-missing-memory", "no memory named 'nothing'", *CHAT, "--memory", "nothing"),
    cli("chat-another-models-memory", "belongs to another model", *CHAT, "--memory", "other", "--remember"),
    cli("chat-damaged-memory", "not a readable LongMem memory file", *CHAT, "--memory", "broken", "--remember"),
    cli("chat-name-parent-dir-new-home", "invalid memory name", *CHAT, "--memory", "../x", "--remember", "--home", "{newhome}"),
    cli("chat-top-p-zero-new-home", "top_p must be in (0, 1]", *CHAT, "--memory", "fresh", "--remember", "--top-p", "0",
        "--temperature", "1", "--home", "{newhome}"),
    cli("chat-max-new-tokens-enormous", "--max-new-tokens", *CHAT, "--memory", "fresh", "--remember", "--home", "{newhome}",
        "--max-new-tokens", HUGE),
    cli("chat-unknown-device", "unknown device 'quantum'", *CHAT, "--memory", "mine", "--device", "quantum"),
    cli("chat-no-memory", "required: --memory", "chat", *M, kind="usage"),
    # -- staleness -----------------------------------------------------------------------------
    cli("staleness-missing-run", "has no metrics.jsonl", "staleness", "--run", "{missing}", "--json", "{out}/s.json"),
    cli("staleness-empty-metrics", "recorded no staleness", "staleness", "--run", "{runs}/metrics-empty", "--json", "{out}/s.json"),
    cli("staleness-garbage-metrics", "metrics.jsonl:2 is not valid JSON", "staleness", "--run", "{runs}/metrics-garbage",
        "--json", "{out}/s.json"),
    cli("staleness-non-utf8-metrics", "metrics.jsonl:1 is not valid JSON", "staleness", "--run", "{runs}/metrics-latin1",
        "--json", "{out}/s.json", sub=True),
    cli("staleness-no-run", "required: --run", "staleness", kind="usage"),
    # -- eval ppl ------------------------------------------------------------------------------
    cli("ppl-empty-data", "no document with at least 2 tokens", *PPL, "--data", "{empty}"),
    cli("ppl-binary-data", "looks binary", *PPL, "--data", "{binary}"),
    cli("ppl-missing-data", "does not exist", *PPL, "--data", "{missing}"),
    cli("ppl-only-short-documents", "longer than one local window", *PPL, "--data", "{short}"),
    # with `datasets` installed (lm-eval brings it) the load fails offline; without it, the message says to install it
    cli("ppl-unknown-hf-dataset-offline", "no-such-org/no-such-data", *PPL, "--data", "hf:no-such-org/no-such-data"),
    cli("ppl-memory-size-zero", "memory_size must be a positive integer, got 0", *PPL, "--data", "{text}", "--memory-size", "0"),
    cli("ppl-memory-size-negative", "memory_size must be a positive integer, got -2", *PPL, "--data", "{text}", "--memory-size", "-2"),
    cli("ppl-chunk-size-zero", "chunk_size must be a positive integer, got 0", *PPL, "--data", "{text}", "--chunk-size", "0"),
    cli("ppl-topk-chunks-zero", "topk_chunks must be a positive integer, got 0", *PPL, "--data", "{text}", "--topk-chunks", "0"),
    cli("ppl-max-tokens-one", "--max-tokens must be at least 2", *PPL, "--data", "{text}", "--max-tokens", "1"),
    cli("ppl-batch-size-zero", "--batch-size must be at least 1", *PPL, "--data", "{text}", "--batch-size", "0"),
    cli("ppl-unknown-device", "unknown device 'quantum'", *PPL, "--data", "{text}", "--device", "quantum"),
    cli("ppl-backbone-swapped", "was trained on another backbone", *PPL, "--data", "{text}", "--model", "{swapped}"),
    cli("ppl-missing-baseline", "is not a folder", *PPL, "--data", "{text}", "--baseline", "{missing}"),
    cli("ppl-hub-id-baseline-offline", "is not a folder", *PPL, "--data", "{text}", "--baseline", NO_SUCH_HUB_ID),
    cli("ppl-no-data", "required: --data", "eval", "ppl", *M, kind="usage"),
    # -- eval chapterbreak / chapterbreak-build ------------------------------------------------
    cli("chapterbreak-empty-file", "is not valid JSON", *CB, "--data", "{empty}"),
    cli("chapterbreak-binary-file", "is not valid JSON", *CB, "--data", "{binary}"),
    cli("chapterbreak-non-utf8-file", "is not valid JSON", *CB, "--data", "{latin1}"),
    cli("chapterbreak-missing-file", "does not exist", *CB, "--data", "{missing}"),
    cli("chapterbreak-unknown-split", "unknown split 'pg20'", *CB, "--data", "{chapterbreak}", "--split", "pg20"),
    cli("chapterbreak-candidate-tokens-enormous", "--max-candidate-tokens must be between 1", *CB, "--data", "{chapterbreak}",
        "--max-candidate-tokens", HUGE),
    cli("chapterbreak-max-examples-negative", "--max-examples must be at least 1", *CB, "--data", "{chapterbreak}", "--max-examples", "-1"),
    cli("chapterbreak-context-tokens-negative", "--max-context-tokens must be at least 1", *CB, "--data", "{chapterbreak}",
        "--max-context-tokens", "-3"),
    cli("chapterbreak-memory-size-zero", "memory_size must be a positive integer", *CB, "--data", "{chapterbreak}", "--memory-size", "0"),
    cli("chapterbreak-backbone-swapped", "was trained on another backbone", *CB, "--data", "{chapterbreak}",
        "--model", "{swapped}"),
    cli("build-missing-book", "does not exist", *BUILD, "--book", "{missing}"),
    cli("build-empty-book", "found 0 chapter headings", *BUILD, "--book", "{empty}"),
    cli("build-binary-book", "looks binary", *BUILD, "--book", "{binary}"),
    cli("build-book-without-chapters", "chapter headings", *BUILD, "--book", "{text}"),
    cli("build-unknown-split", "unknown split 'pg20'", *BUILD, "--book", "{book}", "--split", "pg20"),
    cli("build-negatives-negative", "--negatives must be at least 1", *BUILD, "--book", "{book}", "--negatives", "-1"),
    cli("build-context-chars-zero", "--context-chars must be at least 1", *BUILD, "--book", "{book}", "--context-chars", "0"),
    cli("build-max-examples-negative", "--max-examples must be at least 1", *BUILD, "--book", "{book}", "--max-examples", "-2"),
    cli("build-no-austen-corpus", "no Austen corpus", *BUILD, "--book", "austen:Emma", "--data-root", "{missing}"),
    # -- eval harness ---------------------------------------------------------------------------
    cli("harness-bad-memory-mode", "memory must be on, off or backbone, got 'maybe'", *HARNESS,
        "--model-args", "pretrained={ckpt},memory=maybe"),
    cli("harness-unknown-model-argument", "unknown model argument(s) colour", *HARNESS, "--model-args", "pretrained={ckpt},colour=blue"),
    cli("harness-missing-include-path", "is not a folder of task YAML files", *HARNESS, "--include-path", "{missing}"),
    cli("harness-metadata-not-json", "--metadata is not valid JSON", *HARNESS, "--metadata", "{{oops"),
    cli("harness-limit-zero", "--limit must be positive", *HARNESS, "--limit", "0"),
    cli("harness-output-is-a-folder", "is a folder", *HARNESS, "--output", "{folder}"),
    cli("harness-no-tasks", "required: --tasks", "eval", "harness", kind="usage"),
    cli("build-out-is-a-folder", "is a folder", "eval", "chapterbreak-build", "--book", "{book}", "--out", "{folder}"),
    # -- eval icl ------------------------------------------------------------------------------
    cli("icl-unknown-task", "unknown task 'sst3'", *ICL, "--data", "{sst2}", "--train", "{sst2}", "--task", "sst3"),
    cli("icl-empty-data", "holds no examples (it is empty)", *ICL, "--data", "{empty_tsv}", "--train", "{sst2}"),
    cli("icl-binary-data", "the header must name", *ICL, "--data", "{binary_tsv}", "--train", "{sst2}"),
    cli("icl-text-file", "unknown format '.txt'", *ICL, "--data", "{text}", "--train", "{sst2}"),
    cli("icl-missing-train", "does not exist", *ICL, "--data", "{sst2}", "--train", "{missing}"),
    cli("icl-k-negative", "--k and --memory-demos must be >= 0", *ICL, "--data", "{sst2}", "--train", "{sst2}", "--k", "-1"),
    cli("icl-seeds-zero", "--seeds >= 1", *ICL, "--data", "{sst2}", "--train", "{sst2}", "--seeds", "0"),
    cli("icl-max-test-negative", "--max-test must be at least 1", *ICL, "--data", "{sst2}", "--train", "{sst2}", "--max-test", "-1"),
    cli("icl-memory-size-zero", "memory_size must be a positive integer", *ICL, "--data", "{sst2}", "--train", "{sst2}",
        "--memory-size", "0"),
    cli("icl-backbone-swapped", "was trained on another backbone", *ICL, "--data", "{sst2}", "--train", "{sst2}",
        "--model", "{swapped}"),
    # -- eval facts ----------------------------------------------------------------------------
    cli("facts-tokens-too-few", "--tokens must be at least 1000", "eval", "facts", *M, "--text", "{text}", "--tokens", "10"),
    cli("facts-text-missing", "cannot read", "eval", "facts", *M, "--text", "{missing}"),
    # -- adapt ---------------------------------------------------------------------------------
    cli("adapt-gguf-missing", "does not exist", "adapt", "--backbone", "{missing}.gguf", "--out", "{out}/adapt"),
    cli("adapt-unknown-device", "unknown device", "adapt", "--backbone", "{backbone}", "--out", "{out}/adapt",
        "--device", "gpu0"),
    cli("adapt-unknown-precision", "precision must be fp32 or bf16", "adapt", "--backbone", "{backbone}", "--out",
        "{out}/adapt", "--precision", "fp16"),
    cli("adapt-unknown-facts", "facts must be one of", "adapt", "--backbone", "{backbone}", "--out", "{out}/adapt",
        "--facts", "poems"),
    cli("adapt-unknown-blocks", "blocks must be one of", "adapt", "--backbone", "{backbone}", "--out", "{out}/adapt",
        "--blocks", "every"),
    cli("adapt-unknown-sidenet-init", "sidenet_init must be one of", "adapt", "--backbone", "{backbone}",
        "--out", "{out}/adapt", "--sidenet-init", "zero"),
    # -- serve ---------------------------------------------------------------------------------
    cli("serve-public-host-without-keys", "binds to loopback only", "serve", *M, "--host", "0.0.0.0"),
    cli("serve-api-keys-missing", "no such file", "serve", *M, "--api-keys", "{missing}"),
    # -- eval passkey --------------------------------------------------------------------------
    cli("names-memory-frac-zero", "--memory-frac must be between 0 and 1", *NAMES, "--data", "{text}", "--memory-frac", "0"),
    cli("names-memory-frac-whole", "--memory-frac must be between 0 and 1", *NAMES, "--data", "{text}", "--memory-frac", "1"),
    cli("names-context-zero", "--context-chars must be at least 1", *NAMES, "--data", "{text}", "--context-chars", "0"),
    cli("names-new-tokens-negative", "--new-tokens must be at least 1", *NAMES, "--data", "{text}", "--new-tokens", "-2"),
    cli("names-missing-data", "does not exist", *NAMES, "--data", "{missing}"),
    cli("names-binary-data", "looks binary", *NAMES, "--data", "{binary}"),
    cli("names-json-is-a-folder", "is a folder", "eval", "names", *M, "--data", "{text}", "--json", "{folder}"),
    cli("passkey-distance-zero", "--distances must be positive", *PK, "--distances", "0"),
    cli("passkey-distance-enormous", "--distances must be at most", *PK, "--distances", HUGE),
    cli("passkey-candidates-enormous", "--candidates must be at most", *PK, "--distances", "40", "--candidates", HUGE),
    cli("passkey-max-new-tokens-enormous", "cannot hold the question and the answer", *PK, "--distances", "40", "--max-new-tokens", HUGE),
    cli("passkey-trials-zero", "--trials and --max-new-tokens must be >= 1", *PK, "--distances", "40", "--trials", "0"),
    cli("passkey-memory-size-zero", "memory_size must be a positive integer", *PK, "--distances", "40", "--memory-size", "0"),
    cli("passkey-backbone-swapped", "was trained on another backbone", *PK, "--distances", "40", "--model", "{swapped}"),
    cli("passkey-distance-not-a-number", "invalid int value", *PK, "--distances", "far", kind="usage"),
    cli("eval-no-task", "required: TASK", "eval", kind="usage"),
    # -- the public API ------------------------------------------------------------------------
    api("from-pretrained-missing", "is not a LongMem checkpoint", lambda w: LongMem.from_pretrained(w["missing"])),
    api("from-pretrained-empty-folder", "is not a LongMem checkpoint", lambda w: LongMem.from_pretrained(w["folder"])),
    api("from-pretrained-binary-config", "is not valid JSON", lambda w: LongMem.from_pretrained(w["ckpt_binary_config"])),
    api("from-pretrained-config-not-an-object", "is not a LongMem checkpoint", lambda w: LongMem.from_pretrained(w["ckpt_list_config"])),
    api("from-pretrained-damaged-weights", "is damaged", lambda w: LongMem.from_pretrained(w["ckpt_damaged"])),
    api("from-pretrained-another-backbone", "was trained on another backbone",
        lambda w: LongMem.from_pretrained(w["ckpt"], backbone=make_llama(seed=1))),
    api("from-pretrained-memory-size-zero", "memory_size must be a positive integer",
        lambda w: LongMem.from_pretrained(w["ckpt"], memory_size=0)),
    api("from-backbone-unknown-hub-id-offline", f"cannot load backbone '{NO_SUCH_HUB_ID}'", lambda w: LongMem.from_backbone(NO_SUCH_HUB_ID)),
    api("from-backbone-missing-folder", "cannot load backbone", lambda w: LongMem.from_backbone(w["missing"])),
    api("from-backbone-binary-file", "cannot load backbone", lambda w: LongMem.from_backbone(w["binary"])),
    api("from-backbone-memory-size-zero", "memory_size must be a positive integer, got 0",
        lambda w: LongMem.from_backbone(w["backbone"], memory_size=0)),
    api("from-backbone-memory-size-negative", "memory_size must be a positive integer, got -8",
        lambda w: LongMem.from_backbone(w["backbone"], memory_size=-8)),
    api("from-backbone-chunk-size-not-dividing", "multiple of chunk_size", lambda w: LongMem.from_backbone(w["backbone"], chunk_size=3)),
    api("from-backbone-segment-length-beyond-context", "context",
        lambda w: LongMem.from_backbone(w["backbone"], segment_length=10**6)),
    api("api-generate-token-ids-too-large", "token ids must lie in [0, 300)",
        lambda w: w["model"].generate(torch.tensor([[1, 10**6]]), max_new_tokens=1)),
    api("api-generate-token-ids-negative", "token ids must lie in [0, 300)",
        lambda w: w["model"].generate(torch.tensor([[-1, 2]]), max_new_tokens=1)),
    api("api-generate-float-ids", "must be an integer tensor", lambda w: w["model"].generate(torch.tensor([[1.0, 2.0]]), max_new_tokens=1)),
    api("api-generate-one-dimensional-ids", "(batch, tokens)", lambda w: w["model"].generate(torch.tensor([1, 2]), max_new_tokens=1)),
    api("api-generate-max-new-tokens-negative", "max_new_tokens must be >= 0",
        lambda w: w["model"].generate(torch.tensor([[1, 2]]), max_new_tokens=-1)),
    api("api-generate-another-models-memory", "belongs to another model",
        lambda w: w["model"].generate(torch.tensor([[1, 2]]), memory=w["other_bank"], max_new_tokens=1)),
    api("api-generate-memory-rows-mismatch", "one memory row per batch row",
        lambda w: w["model"].generate(torch.tensor([[1, 2]]), memory=w["model"].new_memory(2), max_new_tokens=1)),
    api("new-memory-size-zero", "memory_size must be a positive integer, got 0", lambda w: w["model"].new_memory(1, memory_size=0)),
    api("new-memory-size-negative", "memory_size must be a positive integer, got -4", lambda w: w["model"].new_memory(1, memory_size=-4)),
    api("new-memory-chunk-not-dividing", "multiple of chunk_size", lambda w: w["model"].new_memory(1, memory_size=10, chunk_size=4)),
    api("new-memory-batch-zero", "batch_size must be a positive integer", lambda w: w["model"].new_memory(0)),
    api("memory-load-missing", "no memory file", lambda w: MemoryBank.load(w["missing"])),
    api("memory-load-empty-file", "not a readable LongMem memory file", lambda w: MemoryBank.load(w["empty"])),
    api("memory-load-binary-file", "not a readable LongMem memory file", lambda w: MemoryBank.load(w["binary"])),
    api("memory-load-truncated", "not a readable LongMem memory file", lambda w: MemoryBank.load(w["home"] / "memories/broken.safetensors")),
    api("memory-load-bit-flipped", "is damaged", lambda w: MemoryBank.load(w["flipped_memory"])),
    api("memory-load-another-model", "belongs to another model",
        lambda w: w["model"].load_memory(w["home"] / "memories/other.safetensors")),
    api("load-model-missing", "is not a LongMem checkpoint", lambda w: load_model(w["missing"])),
    api("load-model-unknown-method", "written by method 'bogus'", lambda w: load_model(w["ckpt_unknown_method"])),
    api("load-model-backbone-swapped", "was trained on another backbone", lambda w: load_model(w["swapped"])),
    api("from-pretrained-trained-on-another-backbone", "was trained on another backbone",
        lambda w: LongMem.from_pretrained(w["foreign"], backbone=w["backbone"])),
    api("verify-result-missing", "is not a file", lambda w: verify_result(w["missing"])),
    api("verify-result-empty", "is truncated or not JSON", lambda w: verify_result(w["empty"])),
    api("verify-result-binary", "is truncated or not JSON", lambda w: verify_result(w["binary"])),
    api("verify-result-truncated", "is truncated or not JSON", lambda w: verify_result(w["result_truncated"])),
    api("verify-result-edited", "do not match the checksum", lambda w: verify_result(w["result_edited"])),
    api("verify-result-unsealed", "carries no checksum", lambda w: verify_result(w["chapterbreak"])),
    api("verify-result-future-format", "result format version 99", lambda w: verify_result(w["result_future"])),
]


# --------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def templates(tiny_checkpoint, tiny_assets, tmp_path_factory):
    """What the cases read, built once: checkpoints gone wrong and a memory store with good and bad memories."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model = LongMem.from_pretrained(tiny_checkpoint).eval()

    # foreign: a SideNet trained on another backbone (same shapes, other weights); swapped: the tiny checkpoint
    # with that other backbone in its backbone/ folder
    other = make_llama(seed=1)
    other.resize_token_embeddings(len(tiny_assets["tokenizer"]))
    LongMem.from_backbone(other, model.config).save_pretrained(root / "foreign", save_backbone=True, tokenizer=tiny_assets["tokenizer"])
    shutil.copytree(tiny_checkpoint, root / "swapped")
    other.save_pretrained(root / "swapped" / "backbone")

    damaged = root / "ckpt-damaged"
    shutil.copytree(tiny_checkpoint, damaged)
    weights = damaged / "sidenet.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for name, text in (("ckpt-binary-config", None), ("ckpt-list-config", "[]\n"),
                       ("ckpt-unknown-method", json.dumps({"format": "longmem-checkpoint", "version": 1, "method": "bogus"}))):
        (root / name).mkdir()
        f = root / name / "longmem.json"
        f.write_bytes(b"\x00\xff\xfe" * 10) if text is None else f.write_text(text)

    memories = root / "home" / "memories"
    memories.mkdir(parents=True)
    mine = model.new_memory(1, memory_size=64)
    ids = torch.arange(2, 34).view(1, -1)
    kv = model.backbone(ids, model.memory_layer, upto=model.memory_layer)
    mine.add(kv.keys, kv.values)
    mine.save(memories / "mine.safetensors")
    other_bank = model.new_memory(1, memory_size=64)
    other_bank.info = {**other_bank.info, "fingerprint": "another-model"}
    other_bank.add(kv.keys, kv.values)
    other_bank.save(memories / "other.safetensors")
    good = (memories / "mine.safetensors").read_bytes()
    (memories / "broken.safetensors").write_bytes(good[: len(good) // 2])
    (memories / "empty.safetensors").write_bytes(b"")
    flipped = bytearray(good)
    flipped[-5] ^= 0x01  # one bit of the last tensor's data
    (root / "flipped.safetensors").write_bytes(bytes(flipped))

    sealed = write_result(root / "result.json", {"longmem": {"ppl": 12.5, "tokens": 99}, "meta": {"data": ["x"]}})
    text = (root / "result.json").read_text()
    (root / "result-truncated.json").write_text(text[: len(text) // 2])
    (root / "result-edited.json").write_text(text.replace("12.5", "11.5"))
    (root / "result-future.json").write_text(json.dumps({**sealed, "format_version": 99}))
    return {"root": root, "model": model, "other_bank": MemoryBank.load(memories / "other.safetensors")}


@pytest.fixture
def world(templates, tiny_checkpoint, tiny_assets, tmp_path, monkeypatch):
    """Placeholders -> paths; the inputs, a copy of the memory store, an empty output folder, runs gone wrong."""
    t = templates["root"]
    w = tmp_path / "w"
    inp, runs, out = w / "in", w / "runs", w / "out"
    for d in (inp, runs, out, inp / "folder", inp / "rdata"):
        d.mkdir(parents=True)
    shutil.copytree(t / "home", w / "home")
    text = sorted(tiny_assets["train"].iterdir())[0].read_text()
    (inp / "text.txt").write_text(text)
    (inp / "short.txt").write_text("alpha beta\n")
    (inp / "short.jsonl").write_text(json.dumps({"id": "a", "text": "alpha beta"}) + "\n")
    (inp / "empty.txt").write_bytes(b"")
    (inp / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (inp / "latin1.txt").write_bytes("Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade.\n".encode("latin-1") * 20)
    (inp / "empty.tsv").write_bytes(b"")
    (inp / "binary.tsv").write_bytes(bytes(range(256)) * 4)
    (inp / "rdata" / "Rdata.rdx").write_bytes(b"\x00\x01garbage")
    (inp / "rdata" / "Rdata.rdb").write_bytes(b"\x00\x01garbage")
    for name, content in (("pretrain/checkpoint/state.pt", b"not a torch checkpoint"), ("pretrain-empty/checkpoint/state.pt", b""),
                          ("trained/checkpoint/COMPLETE", b"ok\n"), ("metrics-empty/metrics.jsonl", b""),
                          ("metrics-garbage/metrics.jsonl", b'{"step": 1, "loss": 2.0}\n{"step": 2, "los\n'),
                          ("metrics-latin1/metrics.jsonl", '{"step": 1, "note": "caf\u00e9"}\n'.encode("latin-1"))):
        (runs / name).parent.mkdir(parents=True, exist_ok=True)
        (runs / name).write_bytes(content)
    monkeypatch.setenv("LONGMEM_HOME", str(w / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    threads = torch.get_num_threads()
    p = {
        "ckpt": tiny_checkpoint, "foreign": t / "foreign", "swapped": t / "swapped",
        "result_truncated": t / "result-truncated.json", "result_edited": t / "result-edited.json",
        "result_future": t / "result-future.json", "backbone": tiny_assets["backbone"], "tok": tiny_assets["root"] / "tok",
        "ckpt_damaged": t / "ckpt-damaged", "ckpt_binary_config": t / "ckpt-binary-config", "ckpt_list_config": t / "ckpt-list-config",
        "ckpt_unknown_method": t / "ckpt-unknown-method", "flipped_memory": t / "flipped.safetensors",
        "text": inp / "text.txt", "short": inp / "short.txt", "short_jsonl": inp / "short.jsonl", "empty": inp / "empty.txt", "binary": inp / "binary.bin",
        "latin1": inp / "latin1.txt", "empty_tsv": inp / "empty.tsv", "binary_tsv": inp / "binary.tsv", "folder": inp / "folder",
        "rdata": inp / "rdata", "missing": inp / "does-not-exist", "home": w / "home", "newhome": w / "new-home", "out": out,
        "runs": runs, "book": FIXTURES / "book_chapters.txt", "chapterbreak": FIXTURES / "chapterbreak_tiny.json",
        "sst2": FIXTURES / "sst2_20.tsv",
    }
    yield {**p, "model": templates["model"], "other_bank": templates["other_bank"],
           "watched": [w, tiny_assets["root"], t, FIXTURES]}
    torch.set_num_threads(threads)  # pretrain and perplexity take every core for themselves


def snapshot(roots) -> dict:
    """{path: (sha256, mtime_ns)} of every file, {path: "dir"} of every folder under ``roots``."""
    state = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            state[dirpath] = "dir"
            for name in filenames:
                p = os.path.join(dirpath, name)
                with open(p, "rb") as f:
                    state[p] = (hashlib.sha256(f.read()).hexdigest(), os.stat(p).st_mtime_ns)
    return state


def _limit_memory():
    """An enormous argument that is not refused must fail the case, not take the machine's memory."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))


def run_cli(argv: list[str], sub: bool, capsys) -> tuple[int, str, str]:
    if sub:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-m", "longmem.cli", *argv], env=env, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL, cwd=Path(__file__).parent.parent, preexec_fn=_limit_memory)
        return r.returncode, r.stdout, r.stderr
    capsys.readouterr()
    try:
        with deadline(60):
            code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


class Hung(BaseException):
    """Not an OSError or Exception: no handler in the code under test can turn it into a clean exit."""


@contextlib.contextmanager
def deadline(seconds: int):
    """An in-process case that runs away (an enormous argument taken) fails instead of hanging the suite."""
    def fail(*_):
        raise Hung(f"no answer in {seconds} s: an argument that should have been refused was taken")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@functools.cache
def parser() -> argparse.ArgumentParser:
    return build_parser()


def command_of(argv: list[str]) -> tuple[str, ...]:
    """The (sub)command path an argv selects in the real parser, e.g. ("memory", "add")."""
    parser_, path = parser(), []
    for token in argv:
        subs = [a for a in parser_._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or token not in subs[0].choices:
            break
        path.append(token)
        parser_ = subs[0].choices[token]
    return tuple(path)


def leaf_commands() -> set[tuple[str, ...]]:
    def walk(parser, prefix):
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            yield prefix
            return
        for name, p in subs[0].choices.items():
            yield from walk(p, prefix + (name,))

    return set(walk(parser(), ()))


# --------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_bad_input(case: Case, world, capsys):
    before = snapshot(world["watched"])
    if case.call is not None:
        with pytest.raises(LongMemError) as e, deadline(60):
            case.call(world)
        message = str(e.value)
        assert "\n" not in message and case.expect in message, message
    else:
        argv = [a.format(**{k: v for k, v in world.items() if isinstance(v, (str, Path))}) for a in case.argv]
        code, out, err = run_cli(argv, case.sub, capsys)
        assert "Traceback" not in out + err, err
        lines = err.splitlines()
        assert code == 2, (code, err)
        cmd = " ".join(command_of(argv))
        if case.kind == "usage":
            assert lines[0].startswith("usage: longmem") and len(lines) >= 2, err
            assert lines[-1].startswith("longmem") and ": error: " in lines[-1] and case.expect in lines[-1], err
        else:
            assert len(lines) == 1, err
            assert lines[0].startswith(f"longmem {cmd.split()[0]}: error: ") and case.expect in lines[0], err
    after = snapshot(world["watched"])
    assert {p for p in after if p not in before} == set(), "left behind"
    assert {p for p in before if p in after and before[p] != after[p]} == set(), "changed"
    assert {p for p in before if p not in after} == set(), "removed"


def test_every_subcommand_has_a_case():
    covered = {command_of(c.argv) for c in CASES if c.argv is not None and c.kind == "error"}
    missing = sorted(" ".join(c) for c in leaf_commands() - covered)
    assert not missing, f"subcommands without a bad-input case: {missing}"
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
