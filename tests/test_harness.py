"""LongMem as an lm-evaluation-harness model: tasks from local files, the three modes, memory use, parity
with ``longmem eval icl`` and ``longmem eval ppl``, and the shared-prefix memory cache."""

import json
import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")  # the optional extra `longmem[eval]`; `make test` installs it

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from longmem import LongMem, LongMemConfig  # noqa: E402
from longmem.eval.harness import LongMemLM  # noqa: E402
from longmem.eval.icl import evaluate_icl, get_task  # noqa: E402
from longmem.eval.icl import Example  # noqa: E402
from longmem.stream_loss import stream_nll  # noqa: E402
from longmem.eval.scoring import score_continuations  # noqa: E402
from longmem.tokens import encode  # noqa: E402
from longmem.loading import load_model_and_tokenizer  # noqa: E402

from conftest import WORDS  # noqa: E402

MODES = ("on", "off", "backbone")


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three harness tasks from local JSONL files: multiple choice, generation, rolling perplexity."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    rows = [{"text": _sentence(rng, 3), "label": i % 2} for i in range(24)]
    (root / "mc_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (root / "mc_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    qa = [{"question": _sentence(rng, 2), "answer": rng.choice(WORDS)} for _ in range(8)]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    docs = [{"text": _sentence(rng, 30)} for _ in range(3)]
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in docs))
    (root / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    train: {root / "mc_train.jsonl"}
    test: {root / "mc_test.jsonl"}
output_type: multiple_choice
training_split: train
fewshot_split: train
test_split: test
fewshot_config:
  sampler: first_n
doc_to_text: "Review: {{{{text}}}} Sentiment:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
target_delimiter: " "
fewshot_delimiter: " "
metric_list:
  - metric: acc
""")
    (root / "tiny_gen.yaml").write_text(f"""task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "qa.jsonl"}
    train: {root / "qa.jsonl"}
output_type: generate_until
training_split: train
fewshot_split: train
test_split: test
doc_to_text: "Q: {{{{question}}}} A:"
doc_to_target: " {{{{answer}}}}"
target_delimiter: ""
fewshot_delimiter: "\\n"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
""")
    (root / "tiny_ppl.yaml").write_text(f"""task: tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {root / "docs.jsonl"}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: bits_per_byte
""")
    return root


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_model_and_tokenizer(checkpoint, "cpu")


def _lm(loaded, **kw):
    model, tok = loaded
    return LongMemLM.from_model(model, tok, **kw)


def _ll(lm, pairs):
    return lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)], disable_tqdm=True)


def test_registered_under_longmem():
    assert get_model("longmem") is LongMemLM


def test_every_task_type_runs_in_all_three_modes(loaded, task_dir):
    tm = TaskManager(include_path=str(task_dir))
    for memory in MODES:
        out = lm_eval.simple_evaluate(model=_lm(loaded, memory=memory), tasks=["tiny_mc", "tiny_gen", "tiny_ppl"],
                                      num_fewshot=None, limit=4, task_manager=tm, log_samples=False,
                                      bootstrap_iters=0)
        r = out["results"]
        assert 0.0 <= r["tiny_mc"]["acc,none"] <= 1.0
        assert 0.0 <= r["tiny_gen"]["exact_match,none"] <= 1.0
        assert r["tiny_ppl"]["word_perplexity,none"] > 1.0
        assert {"results", "configs", "versions", "n-shot"} <= set(out)
        assert out["config"]["model"] == "longmem" and out["config"]["memory"] == memory


def test_cli_runs_three_modes_and_writes_json(checkpoint, cli, task_dir, tmp_path, capsys):
    out = tmp_path / "h.json"
    assert cli("harness", "--tasks", "tiny_mc", "tiny_gen", "--include-path", task_dir, "--num-fewshot", "3",
               "--limit", "3", "--model-args", f"pretrained={checkpoint},device=cpu", "--output", out,
               "--no-progress") == 0
    table = capsys.readouterr().out
    assert "tiny_mc" in table and "backbone" in table
    report = json.loads(out.read_text())
    assert set(report["modes"]) == set(MODES)
    for memory in MODES:
        assert 0.0 <= report["modes"][memory]["results"]["tiny_mc"]["acc,none"] <= 1.0
        assert report["modes"][memory]["n-shot"]["tiny_mc"] == 3
    # one mode when --model-args names it
    assert cli("harness", "--tasks", "tiny_mc", "--include-path", task_dir, "--limit", "2",
               "--model-args", f"pretrained={checkpoint},memory=off", "--output", out, "--no-progress") == 0
    assert set(json.loads(out.read_text())["modes"]) == {"off"}


@pytest.mark.parametrize("args, message", [
    ("memory=maybe", "memory must be on, off or backbone"),
    ("colour=blue", "unknown model argument(s) colour"),
    ("dtype=int3", "dtype must be one of"),
    ("memory_size=-4", "memory_size must be an integer >= 1"),
    ("memory_size=7,chunk_size=2", "multiple of chunk_size"),
    ("batch_size=0", "batch_size must be an integer >= 1"),
    ("pretrained=/no/such/folder", "not a LongMem checkpoint"),
])
def test_bad_model_arguments_are_one_line(checkpoint, cli, task_dir, capsys, args, message):
    if "pretrained" not in args:
        args = f"pretrained={checkpoint},{args}"
    assert cli("harness", "--tasks", "tiny_mc", "--include-path", task_dir, "--model-args", args, "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_unknown_task_is_one_line(checkpoint, cli, task_dir, capsys):
    assert cli("harness", "--tasks", "no_such_task", "--include-path", task_dir,
               "--model-args", f"pretrained={checkpoint}", "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no_such_task" in err[0] and "did you mean" not in err[0], err


@pytest.mark.parametrize("name, meant", [("vt", "ruler_vt"), ("niah_singel_1", "niah_single_1")])
def test_a_near_task_name_is_suggested(checkpoint, cli, task_dir, capsys, name, meant):
    assert cli("harness", "--tasks", name, "--include-path", task_dir,
               "--model-args", f"pretrained={checkpoint}", "--no-progress") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"did you mean {meant}" in err[0], err


def _demos(n, seed=0):
    rng = random.Random(seed)
    return "".join(f" Review: {_sentence(rng, 3)} Sentiment: {rng.choice(['negative', 'positive'])}." for _ in range(n))


def test_memory_matters_only_beyond_the_window(loaded):
    model, tok = loaded
    T = model.segment_length
    short = [(" Review: alpha", " beta"), (" Review: alpha", " gamma delta")]
    on, off = _ll(_lm(loaded, memory="on"), short), _ll(_lm(loaded, memory="off"), short)
    assert on == off  # nothing to remember: LongMem's no-memory scores, exactly
    ctx = encode(tok, " Review: alpha")
    conts = [encode(tok, c) for _, c in short]
    assert [lp for lp, _ in on] == [float(score_continuations(model, "no_memory", ctx[-(T + 1 - len(c)):], [c]).logprobs[0].sum())
                                    for c in conts]
    # demonstrations overflowing the window: the memory holds the oldest, and changes the scores
    long = [(_demos(12) + " Review: alpha beta", " Sentiment: positive"), (_demos(12) + " Review: gamma", " Sentiment: negative")]
    assert len(encode(tok, long[0][0])) > 4 * T
    on, off, bb = (_ll(_lm(loaded, memory=m), long) for m in MODES)
    assert all(a[0] != b[0] for a, b in zip(on, off)) and all(a[0] != b[0] for a, b in zip(off, bb))


def test_prefix_cache_equals_recomputation(loaded):
    demos = _demos(40, seed=3)
    rng = random.Random(1)
    pairs = [(demos + f" Review: {_sentence(rng, 1 + i % 4)} Sentiment:", c)
             for i in range(6) for c in (" negative", " positive")]
    pairs += [(_demos(20, seed=4) + " Review: x Sentiment:", " positive")]  # another prefix
    cached, fresh = _lm(loaded, memory="on"), _lm(loaded, memory="on", prefix_cache=0)
    assert _ll(cached, pairs) == _ll(fresh, pairs)
    assert cached.stats["prefix_tokens_written"] < fresh.stats["prefix_tokens_written"] / 3
    assert _ll(cached, pairs) == _ll(fresh, pairs)  # and again, now served from the cache
    assert cached.stats["prefix_hits"] > 0
    # generation copies a cached memory before the window slides into it
    gen = [Instance("generate_until", {}, (demos + " Review: alpha", {"until": ["."], "max_gen_toks": 12}), 0)] * 2
    a, b = cached.generate_until(gen, disable_tqdm=True), fresh.generate_until(gen, disable_tqdm=True)
    assert a == b and a[0] == a[1]


def _rolling(loaded, text):
    return {m: _lm(loaded, memory=m).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)],
                                                           disable_tqdm=True)[0] for m in MODES}


def test_loglikelihood_rolling_uses_lm_evals_rolling_windows(loaded):
    """lm-eval's windows (one token of context, disjoint predictions) read the document after end-of-text in windows
    of T; the last one reads the last T tokens. ``backbone`` equals the HF backbone itself on those windows; on a
    document of whole windows, every mode equals ``longmem eval ppl``'s stream of that same sequence."""
    model, tok = loaded
    T = model.segment_length
    ids = encode(tok, _demos(8, seed=5))
    n = 8 * T + 5  # a last partial window
    ids, text = ids[:n], tok.decode(ids[:n])
    assert np.array_equal(encode(tok, text), ids)
    stream = np.concatenate([[tok.eos_token_id], ids])  # (n + 1,)
    plain = 0.0
    for start in range(0, n, T):
        first = min(start, n - T)  # the last window reads the last T inputs, scoring what is left
        x = torch.as_tensor(stream[first:first + T]).view(1, -1)
        logp = torch.log_softmax(model.backbone.model(x).logits[0].float(), -1)[start - first:]
        plain += float(logp.gather(-1, torch.as_tensor(ids[start:first + T]).view(-1, 1)).double().sum())
    assert _rolling(loaded, text)["backbone"] == pytest.approx(plain, rel=1e-5)
    ids, text = ids[:8 * T], tok.decode(ids[:8 * T])  # whole windows: exactly `longmem eval ppl`'s windows
    assert np.array_equal(encode(tok, text), ids)
    rolling = _rolling(loaded, text)
    for memory, mode in zip(MODES, ("longmem", "no_memory", "backbone")):
        nll = stream_nll(model, [np.concatenate([[tok.eos_token_id], ids])], mode)
        assert nll.tokens == len(ids)
        assert rolling[memory] == pytest.approx(-nll.total, rel=1e-6), memory
    assert rolling["on"] != rolling["off"]


def test_same_scores_as_longmem_eval_icl(tiny_assets, tmp_path):
    """The harness path and `longmem eval icl` on the same examples and demonstrations: the window is sized so
    that the local demonstrations and the prompt fill it exactly, as the harness fills it."""
    tok, task = tiny_assets["tokenizer"], get_task("sst2")
    rng = random.Random(7)
    pool = [Example(_sentence(rng, 2), i % 2) for i in range(30)]
    demo = lambda e: encode(tok, task.demonstration(e.text, e.label))  # noqa: E731
    prompt_len = lambda e: len(encode(tok, task.prompt(e.text)))  # noqa: E731
    candidates = [Example(_sentence(rng, 2), i % 2) for i in range(60)]
    P = prompt_len(candidates[0])
    test = [e for e in candidates if prompt_len(e) == P][:4]
    labels = [encode(tok, c) for c in task.label_continuations()]
    k, seed = 1, 1
    n_mem = next(n for n in range(6, 20)
                 if sum(len(demo(e)) for e in random.Random(seed).sample(pool, k + n)[k:]) % 2 == 0)
    r = random.Random(seed)
    local_demos, mem_demos = r.sample(pool, k), r.sample(pool, n_mem)
    # the harness splits a context by its continuation's length, `longmem eval icl` by the longest label's: they
    # agree on the longest label (a shorter one keeps more of the context local in the harness)
    longest = [i for i, x in enumerate(labels) if len(x) == max(map(len, labels))]
    T = sum(len(demo(e)) for e in local_demos) + P + len(labels[longest[0]]) - 1  # the last label token is only predicted
    mem_tokens = sum(len(demo(e)) for e in mem_demos)
    path = tmp_path / "icl-model"
    LongMem.from_backbone(tiny_assets["backbone"], LongMemConfig(chunk_size=2, memory_size=64, topk_chunks=4,
                                                                 segment_length=T)).save_pretrained(
        path, save_backbone=True, tokenizer=tok)
    model, tok = load_model_and_tokenizer(path, "cpu")
    memory_size = max(64, -(-mem_tokens // 2) * 2)
    report = evaluate_icl(model, tok, task, test, pool, k=k, memory_demos=n_mem, seeds=1, seed=seed,
                          memory_kwargs={"memory_size": memory_size}, keep_scores=True, warn=lambda m: None)
    assert report["longmem"]["local_demos"] == k
    context = "".join(task.demonstration(e.text, e.label) for e in mem_demos + local_demos)
    for memory, mode in zip(MODES, ("longmem", "no_memory", "backbone")):
        lm = LongMemLM.from_model(model, tok, memory=memory, chunk_size=2, memory_size=memory_size)
        pairs = [(context + task.prompt(e.text), task.label_continuations()[i]) for e in test for i in longest]
        scores = [lp for lp, _ in _ll(lm, pairs)]
        assert scores == [ex[i] for ex in report[mode]["scores"][0] for i in longest], mode
    assert lm.window(encode(tok, pairs[0][0]), len(labels[longest[0]]))[0].shape[0] == mem_tokens
    with torch.no_grad():  # and the memory mattered
        assert report["longmem"]["scores"] != report["no_memory"]["scores"]


def test_a_continuation_longer_than_the_window_is_streamed_as_ppl_streams(loaded):
    model, tok = loaded
    ctx, cont = " Review: alpha beta gamma", _demos(2, seed=9)
    ids = encode(tok, ctx + cont)
    n_ctx = len(encode(tok, ctx))
    assert len(ids) - n_ctx > model.segment_length
    for memory, mode in zip(MODES, ("longmem", "no_memory", "backbone")):
        [(lp, greedy)] = _ll(_lm(loaded, memory=memory), [(ctx, cont)])
        table = stream_nll(model, [ids], mode, keep_tokens=True).token_table()
        assert lp == pytest.approx(-sum(v for (_, pos), v in table.items() if pos >= n_ctx), rel=1e-6)  # fp32 sums
        assert greedy is False


def test_the_harness_builds_the_model_from_an_argument_string(checkpoint):
    lm = get_model("longmem").create_from_arg_string(f"pretrained={checkpoint},memory=off,memory_size=64",
                                                     {"batch_size": None, "max_batch_size": None, "device": "cpu"})
    assert isinstance(lm, LongMemLM) and lm.mode == "no_memory" and lm.memory_kwargs == {"memory_size": 64}


@pytest.mark.parametrize("memory", MODES)
def test_a_score_does_not_depend_on_the_other_requests_of_its_batch(loaded, memory):
    model, tok = loaded
    rng = random.Random(11)
    long_ctx = _demos(10, seed=6) + " Review: alpha Sentiment:"
    assert len(encode(tok, long_ctx)) > 4 * model.segment_length
    conts = [" positive", " negative", " " + _sentence(rng, 3), " " + _sentence(rng, 6), ""]
    pairs = [(ctx, c) for ctx in (long_ctx, " Review: beta Sentiment:") for c in conts]
    pairs.append((long_ctx, " " + _sentence(rng, 2 * model.segment_length)))  # longer than the window: streamed
    together = dict(zip(pairs, _ll(_lm(loaded, memory=memory, batch_size=8), pairs)))
    alone = {p: _ll(_lm(loaded, memory=memory, batch_size=1), [p])[0] for p in pairs}
    order = pairs[:]
    random.Random(3).shuffle(order)
    split = {}
    for part in (order[:3], order[3:7], order[7:]):  # shuffled, in three batches of another size
        split.update(zip(part, _ll(_lm(loaded, memory=memory, batch_size=2), part)))
    assert together == alone == split


def test_off_and_backbone_are_the_plain_model_on_the_same_tokens(loaded):
    """With memory off, a score is the plain model's on the tokens the harness's own HF model reads: the last
    T + 1 tokens of context + continuation but the last (no token fewer, no rounding to whole chunks)."""
    model, tok = loaded
    T = model.segment_length
    rng = random.Random(5)
    for n_ctx in (3, T - 2, T + 1, 3 * T + 1, 3 * T + 2):  # fits, fits with no room to spare, overflows (odd, even)
        ctx = encode(tok, _demos(6, seed=n_ctx))[:n_ctx]
        assert len(ctx) == n_ctx
        for n_cont in (1, 2, 5, T):
            cont = encode(tok, " " + _sentence(rng, 2 * T))[:n_cont]
            text_ctx, text_cont = tok.decode(ctx), tok.decode(cont)
            assert np.array_equal(encode(tok, text_ctx + text_cont), np.concatenate([ctx, cont]))  # same tokens back
            window = np.concatenate([ctx, cont])[-(T + 1):]
            x = torch.as_tensor(window[:-1]).view(1, -1)  # (1, <= T): what the plain model reads
            target = torch.as_tensor(window[1:])[-n_cont:]
            plain = {"off": model(x).logits, "backbone": model.backbone.model(x).logits}  # the HF model itself
            for memory, logits in plain.items():
                logp = torch.log_softmax(logits[0, -n_cont:].float(), -1).gather(-1, target.view(-1, 1))
                [(lp, _)] = _ll(_lm(loaded, memory=memory), [(text_ctx, text_cont)])
                assert lp == pytest.approx(float(logp.double().sum()), rel=1e-5, abs=1e-5), (memory, n_ctx, n_cont)
