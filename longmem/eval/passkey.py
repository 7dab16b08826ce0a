"""Pass-key retrieval: can the model recall a number it read far beyond its local window?

A 5-digit key is hidden early in a long filler text (the test of Mohtashami and Jaggi, 2023) and
asked for at the end:

    There is an important piece of information hidden inside a lot of irrelevant text. ...
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.  (x a few)
    The pass key is 48213. Remember it. 48213 is the pass key.
    The grass is green. ...                                                         (x distance)
    What is the pass key? The pass key is

``distance`` is the number of tokens from the end of the key sentence to the end of the question
(whole filler sentences, so it is met or exceeded by less than one filler). The last
``T - max_new_tokens`` tokens are the local window; the rest is written to memory (``longmem`` mode)
or simply not seen (``no_memory``, ``backbone``). Each trial draws a fresh key and lead-in.

Two rules, both reported:

``greedy``  exact match: the model greedily generates ``max_new_tokens`` tokens (not written to
            memory); the first run of digits in the decoded text must equal the key.
``choice``  the key must be strictly the most likely (summed log-probability as the continuation
            of the question) among itself and ``candidates - 1`` other random 5-digit numbers.
"""

from __future__ import annotations

import random
import re
import sys

import numpy as np
import torch
from tqdm import tqdm

from longmem.errors import LongMemError
from longmem.eval.scoring import MODES, encode, fill_memory, score_continuations, split_context, window_logits

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = " The pass key is {key}. Remember it. {key} is the pass key."
KEY_TAIL = " is the pass key."  # what follows the key's last occurrence
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"
LEAD_IN = 3  # at most this many filler sentences before the key
KEYS = 90_000  # 5-digit keys, 10000-99999
MAX_DISTANCE = 10_000_000  # a bound against typos: the prompt's ids are built in RAM and read through the model


def build_prompt(tokenizer, key: str, distance: int, lead_in: int) -> tuple[np.ndarray, int, int]:
    """The prompt's token ids, its actual distance (tokens from the end of the key sentence to the
    end) and the index just after the key's last token.

    The pieces are tokenized one by one: each starts with a space-led word, so their concatenation
    is exactly the tokenization of the whole text.
    """
    filler, question = encode(tokenizer, FILLER), encode(tokenizer, QUESTION)
    sentence, tail = encode(tokenizer, KEY.format(key=key)), encode(tokenizer, KEY_TAIL)
    n = max(0, -(-(distance - len(question)) // len(filler)))
    head = [encode(tokenizer, INTRO)] + [filler] * lead_in
    key_end = sum(len(p) for p in head) + len(sentence) - len(tail)
    ids = np.concatenate(head + [sentence] + [filler] * n + [question])
    return ids, n * len(filler) + len(question), key_end


@torch.no_grad()
def greedy_generate(model, mode: str, context: np.ndarray, steps: int, memory=None) -> list[int]:
    """``steps`` greedy tokens after ``context`` in one local window (recomputed each step; the memory
    is read, never written)."""
    ids = torch.as_tensor(context, dtype=torch.long, device=model.device).view(1, -1)
    out = []
    for _ in range(steps):
        nxt = window_logits(model, mode, ids, memory)[0, -1].argmax()
        out.append(int(nxt))
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


def answer_digits(text: str) -> str:
    """The first run of digits of a generated answer ('' if it does not start with one, spaces aside)."""
    m = re.match(r"\s*(\d+)", text)
    return m.group(1) if m else ""


def evaluate_passkey(model, tokenizer, distances: list[int], *, trials: int = 10, seed: int = 0, modes=MODES,
                     memory_kwargs: dict | None = None, candidates: int = 10, max_new_tokens: int = 8,
                     progress: bool = False, warn=None) -> dict:
    """Accuracy by distance for each mode and rule; see the module docstring."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if not distances or min(distances) < 1:
        raise LongMemError(f"--distances must be positive token counts, got {distances}")
    if trials < 1 or candidates < 2 or max_new_tokens < 1:
        raise LongMemError(f"--trials and --max-new-tokens must be >= 1 and --candidates >= 2, got {trials}, {max_new_tokens}, {candidates}")
    if candidates > KEYS:
        raise LongMemError(f"--candidates must be at most {KEYS:,} (the number of 5-digit keys), got {candidates}")
    if max(distances) > MAX_DISTANCE:
        raise LongMemError(f"--distances must be at most {MAX_DISTANCE:,} tokens (the prompt is built whole), got {max(distances)}")
    memory_kwargs = dict(memory_kwargs or {})
    T = model.segment_length
    M = memory_kwargs.get("memory_size") or model.config.memory_size
    chunk = memory_kwargs.get("chunk_size") or model.config.chunk_size
    rng = random.Random(seed)
    was_training = model.training
    model.eval()
    results = {mode: {} for mode in modes}
    meta = {}
    bar = tqdm(total=len(distances) * trials, desc="passkey", unit="trial", disable=not progress, leave=False)
    for distance in distances:
        tally = {mode: {"greedy": 0, "choice": 0, "key_logprob": 0.0} for mode in modes}
        actual, in_window = [], 0
        for _ in range(trials):
            key = f"{rng.randrange(10000, 100000)}"
            others = set()
            while len(others) < candidates - 1:
                other = f"{rng.randrange(10000, 100000)}"
                if other != key:
                    others.add(other)
            answers = [encode(tokenizer, ANSWER.format(key=k)) for k in [key] + sorted(others)]
            ids, dist, key_end = build_prompt(tokenizer, key, distance, rng.randint(0, LEAD_IN))
            actual.append(dist)
            local_len = T - max(max_new_tokens, max(len(a) for a in answers))
            if local_len < len(encode(tokenizer, QUESTION)):
                raise LongMemError(f"the local window ({T} tokens) cannot hold the question and the answer")
            mem_ids, local = split_context(ids, local_len, chunk)
            in_window += key_end > len(mem_ids)  # the key itself is in the local window
            for mode in modes:
                memory = None
                if mode == "longmem":
                    memory = model.new_memory(1, **memory_kwargs)
                    fill_memory(model, memory, mem_ids)
                generated = greedy_generate(model, mode, local, max_new_tokens, memory)
                tally[mode]["greedy"] += answer_digits(tokenizer.decode(generated)) == key
                sums = [float(lp.sum()) for lp in score_continuations(model, mode, local, answers, memory).logprobs]
                tally[mode]["choice"] += sums[0] > max(sums[1:])
                tally[mode]["key_logprob"] += sums[0]
            bar.update(1)
        if in_window:
            warn(f"distance {distance}: the key is within the local window ({len(local)} tokens) in {in_window} of {trials} trials; "
                 "choose distances beyond the window to test the memory")
        if max(actual) > M:
            warn(f"distance {distance} exceeds the memory ({M} tokens): the key is evicted before the question")
        meta[str(distance)] = {"actual_distance": float(np.mean(actual)), "key_in_local_window": in_window}
        for mode in modes:
            t = tally[mode]
            results[mode][str(distance)] = {"accuracy_greedy": t["greedy"] / trials, "accuracy_choice": t["choice"] / trials,
                                            "key_logprob": t["key_logprob"] / trials, "trials": trials}
    bar.close()
    model.train(was_training)
    report = {"distances": list(distances), "trials": trials, "segment_length": T, "memory_size": M,
              "candidates": candidates, "chance_choice": 1 / candidates, "max_new_tokens": max_new_tokens,
              "by_distance": meta,
              "rules": {"accuracy_greedy": "greedy generation, first digit run equals the key",
                        "accuracy_choice": f"key most likely among {candidates} 5-digit candidates"}}
    for mode in modes:
        report[mode] = {
            "by_distance": results[mode],
            "accuracy_greedy": float(np.mean([r["accuracy_greedy"] for r in results[mode].values()])),
            "accuracy_choice": float(np.mean([r["accuracy_choice"] for r in results[mode].values()])),
        }
    return report
