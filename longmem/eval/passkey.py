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
Modes: ``longmem`` (local window + memory), ``no_memory`` (same weights, window only), ``backbone`` (the
frozen backbone on the same window) and, when asked, ``backbone_full`` (the backbone with the whole prompt in
its own context, for prompts that fit it). Each prompt is read once through the KV-cached decoder: the greedy
answer and every candidate's score come from that one read.

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
from longmem.baselines import PlainBackbone
from longmem.eval.scoring import MODES, WindowEntries, fill_memory, split_context
from longmem.generation import Decoder, SamplingConfig, generate_stream
from longmem.tokens import encode

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY = " The pass key is {key}. Remember it. {key} is the pass key."
KEY_TAIL = " is the pass key."  # what follows the key's last occurrence
QUESTION = " What is the pass key? The pass key is"
ANSWER = " {key}"
LEAD_IN = 3  # at most this many filler sentences before the key
KEYS = 90_000  # 5-digit keys, 10000-99999
FULL = "backbone_full"  # the backbone with the whole prompt in its own context (where it fits)
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
def read_and_answer(net, context: np.ndarray, answers: list[np.ndarray], max_new_tokens: int, memory=None) -> tuple[list[int], list[float]]:
    """Read ``context`` once through a KV-cached ``Decoder``; from that one read, score each candidate answer
    (summed log-probability, each on its own fork of the cache) and generate ``max_new_tokens`` greedily.
    The memory is read, never written.

    Returns:
        the greedy tokens and each answer's summed log-probability.
    """
    ctx = torch.as_tensor(context, dtype=torch.long, device=net.device).view(1, -1)
    dec = Decoder(net, 1, memory)
    if ctx.shape[1] > 1:
        dec.feed(ctx[:, :-1])
    sums = []
    for answer in answers:
        a = torch.as_tensor(answer, dtype=torch.long, device=net.device).view(1, -1)
        logits = dec.fork().feed_all(torch.cat([ctx[:, -1:], a[:, :-1]], dim=1))[0]  # (len(a), V)
        sums.append(float(torch.log_softmax(logits.double(), dim=-1).gather(1, a.view(-1, 1)).sum()))
    cfg = SamplingConfig(max_new_tokens=max_new_tokens)
    generated = [int(t) for t in generate_stream(net, ctx[:, -1:], cfg=cfg, decoder=dec)]
    return generated, sums


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
    entries = WindowEntries(model)  # the filler's windows recur across trials: each is read once
    for distance in distances:
        tally = {mode: {"greedy": 0, "choice": 0, "key_logprob": 0.0, "skipped": 0} for mode in modes}
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
                memory, net, context = None, model, local
                if mode == "longmem":
                    memory = model.new_memory(1, **memory_kwargs)
                    fill_memory(model, memory, mem_ids, entries)
                elif mode == "backbone":
                    net = PlainBackbone(model)
                elif mode == FULL:
                    if len(ids) + max_new_tokens > model.backbone.max_positions:
                        tally[mode]["skipped"] += 1
                        continue
                    net, context = PlainBackbone(model, window=model.backbone.max_positions), ids
                generated, sums = read_and_answer(net, context, answers, max_new_tokens, memory)
                tally[mode]["greedy"] += answer_digits(tokenizer.decode(generated)) == key
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
            done = trials - t["skipped"]
            if not done:  # the whole prompt does not fit the backbone's context: no figure, not a zero
                results[mode][str(distance)] = {"accuracy_greedy": None, "accuracy_choice": None, "key_logprob": None,
                                                "trials": 0}
                continue
            results[mode][str(distance)] = {"accuracy_greedy": t["greedy"] / done, "accuracy_choice": t["choice"] / done,
                                            "key_logprob": t["key_logprob"] / done, "trials": done}
    bar.close()
    model.train(was_training)
    report = {"distances": list(distances), "trials": trials, "segment_length": T, "memory_size": M,
              "candidates": candidates, "chance_choice": 1 / candidates, "max_new_tokens": max_new_tokens,
              "by_distance": meta,
              "rules": {"accuracy_greedy": "greedy generation, first digit run equals the key",
                        "accuracy_choice": f"key most likely among {candidates} 5-digit candidates"}}
    report["modes"] = list(modes)
    for mode in modes:
        measured = [r for r in results[mode].values() if r["trials"]]
        report[mode] = {
            "by_distance": results[mode],
            "accuracy_greedy": float(np.mean([r["accuracy_greedy"] for r in measured])) if measured else None,
            "accuracy_choice": float(np.mean([r["accuracy_choice"] for r in measured])) if measured else None,
        }
    return report
