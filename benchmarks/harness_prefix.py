"""Shared-prefix memory cache of the harness model: a 2,000-demonstration in-context-learning run with and without it.

The paper's ICL protocol puts the same N demonstrations before every test input. Through the harness
(``longmem.eval.harness.LongMemLM``, memory=on) each request's context is then N demonstrations + a test
prompt: everything but the last window goes to memory. Without the cache every request writes the whole
prefix into a fresh memory; with it the prefix up to its last whole window is written once and copied per
request, and only the rest (< one window) is written per request. Both are timed on the same requests in
one run, and their scores are checked to be identical.

    python benchmarks/harness_prefix.py                  # full: longmem-tiny, 2,000 demonstrations, 10 test inputs
    python benchmarks/harness_prefix.py --quick          # seconds: 100 demonstrations, 3 test inputs

Figures: seconds per test input (its two label continuations scored), median over the inputs; the
first input (which writes the prefix into the cache) is reported separately and is in the median. The model is
longmem-tiny unless --model names another (BENCHMARKS.md's figures are longmem-tiny's).
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from lm_eval.api.instance import Instance  # noqa: E402

from longmem.eval.harness import LongMemLM  # noqa: E402
from longmem.loading import TINY_MODEL, load_model_and_tokenizer  # noqa: E402
from longmem.tokens import token_ids  # noqa: E402

WORDS = ("the a film story actor plot scene music ending moment script director cast character dialogue camera "
         "good bad great dull fine slow sharp warm cold funny sad long short bright dark").split()
LABELS = (" negative", " positive")


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def main(argv=None) -> dict:
    p = common.parser("harness_prefix", __doc__, full_repeats=1)
    p.add_argument("--demos", type=int, default=None, help="demonstrations before every test input (default 2000; quick 100)")
    p.add_argument("--inputs", type=int, default=None, help="test inputs (default 10; quick 3)")
    args = common.parse(p, argv)
    device = common.setup(args)
    started = time.perf_counter()
    demos = args.demos or (100 if args.quick else 2000)
    inputs = args.inputs or (3 if args.quick else 10)
    model, tok = load_model_and_tokenizer(args.model or TINY_MODEL, device)
    rng = random.Random(args.seed)
    prefix = "".join(f" Review: {sentence(rng, rng.randint(4, 9))} Sentiment:{rng.choice(LABELS)}." for _ in range(demos))
    prompts = [prefix + f" Review: {sentence(rng, rng.randint(4, 9))} Sentiment:" for _ in range(inputs)]
    prefix_tokens = len(token_ids(tok, prefix))
    config = {"model": str(args.model or TINY_MODEL.name), "demonstrations": demos, "test_inputs": inputs,
              "prefix_tokens": prefix_tokens, "segment_length": model.segment_length, "chunk_size": 2,
              "memory_size": 65536}
    rows, scores = [], {}
    for name, cache in (("no cache", 0), ("prefix cache", 4)):
        lm = LongMemLM.from_model(model, tok, memory="on", chunk_size=2, memory_size=65536, prefix_cache=cache)
        times, out = [], []
        for i, ctx in enumerate(prompts):
            reqs = [Instance("loglikelihood", {}, (ctx, label), j) for j, label in enumerate(LABELS)]
            common.sync(device)
            t0 = time.perf_counter()
            out += lm.loglikelihood(reqs, disable_tqdm=True)
            common.sync(device)
            times.append(time.perf_counter() - t0)
        scores[name] = out
        stats = common.summarize(times)
        rows.append({"config": name, "median_s": stats["median_s"], "first_s": times[0], "min_s": stats["min_s"],
                     "max_s": stats["max_s"], "total_s": sum(times), "tokens_written": lm.stats["prefix_tokens_written"]
                     + lm.stats["tail_tokens_written"], "times_s": times})
    identical = scores["no cache"] == scores["prefix cache"]
    ratio = rows[0]["median_s"] / rows[1]["median_s"]
    for row in rows:
        row["speedup"] = rows[0]["median_s"] / row["median_s"]
    targets = [common.target("median speed-up with the prefix cache", ratio, ">=", 5.0,
                             f"{prefix_tokens} prefix tokens, window {model.segment_length}"),
               common.target("scores identical with and without the cache", float(identical), ">=", 1.0)]
    return common.finish(args, "harness_prefix", config, rows, targets,
                  ["config", "median_s", "first_s", "total_s", "tokens_written", "speedup"], started,
                  extra={"identical_scores": identical})


if __name__ == "__main__":
    main()
