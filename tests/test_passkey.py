"""Pass-key retrieval: prompt layout, answer parsing, read-only memory, the command end to end."""

import json

import numpy as np
import pytest
import torch

from longmem import LongMem, LongMemConfig
from longmem.eval.scoring import WindowEntries, fill_memory
from longmem.tokens import encode
from longmem.cli import main
from longmem.eval.passkey import FILLER, INTRO, KEY, QUESTION, answer_digits, build_prompt, read_and_answer
from longmem.baselines import PlainBackbone


@pytest.fixture(scope="module")
def checkpoint(tiny_assets, tmp_path_factory):
    """Overrides conftest's: the question alone is ~30 tokens of the tiny tokenizer, so a 64-token window."""
    path = tmp_path_factory.mktemp("pk") / "ckpt"
    cfg = LongMemConfig(chunk_size=2, memory_size=1024, topk_chunks=4, segment_length=64)
    LongMem.from_backbone(tiny_assets["backbone"], cfg).save_pretrained(path, save_backbone=True, tokenizer=tiny_assets["tokenizer"])
    return path


def test_prompt_is_the_whole_text_tokenized_and_the_distance_is_met(tiny_assets):
    tok = tiny_assets["tokenizer"]
    ids, dist, key_end = build_prompt(tok, "48213", 60, lead_in=2)
    filler = len(encode(tok, FILLER))
    n = (dist - len(encode(tok, QUESTION))) // filler
    text = INTRO + FILLER * 2 + KEY.format(key="48213") + FILLER * n + QUESTION
    assert np.array_equal(ids, encode(tok, text))
    assert 60 <= dist < 60 + filler
    assert tok.decode(ids[:key_end].tolist()).endswith("48213")
    assert len(ids) - key_end > dist  # the key comes before the filler that makes the distance


def test_answer_digits():
    assert answer_digits(" 48213. Remember") == "48213"
    assert answer_digits("48213") == "48213"
    assert answer_digits(" the key") == ""
    assert answer_digits(" 4821") == "4821"


def test_generation_reads_the_memory_without_writing_it(checkpoint, tiny_assets):
    model = LongMem.from_pretrained(checkpoint).eval()
    ids, _, _ = build_prompt(tiny_assets["tokenizer"], "12345", 40, lead_in=0)
    memory = model.new_memory(1)
    fill_memory(model, memory, ids[:-10])
    before = memory.num_tokens(0) + memory.num_pending(0)
    answers = [np.array([5, 7, 9]), np.array([11, 3])]
    out, sums = read_and_answer(model, ids[-10:], answers, 4, memory)
    assert memory.num_tokens(0) + memory.num_pending(0) == before == len(ids) - 10
    ref = torch.as_tensor(ids[-10:]).view(1, -1)
    with torch.no_grad():
        for _ in range(4):
            ref = torch.cat([ref, model(ref, memory=memory, update_memory=False).logits[0, -1].argmax().view(1, 1)], 1)
        assert out == ref[0, 10:].tolist()
        for a, got in zip(answers, sums):  # each candidate scored from the cached prefix = a full recompute
            full = torch.as_tensor(np.concatenate([ids[-10:], a])).view(1, -1)
            logp = torch.log_softmax(model(full, memory=memory, update_memory=False).logits[0].double(), -1)
            want = sum(float(logp[9 + i, t]) for i, t in enumerate(a))
            assert abs(got - want) < 1e-4


def test_windows_read_once_fill_the_same_memory(checkpoint, tiny_assets):
    """Pass-key prompts share their filler windows: with WindowEntries each is read once, and every memory holds
    exactly what writing the whole text holds."""
    model = LongMem.from_pretrained(checkpoint).eval()
    entries = WindowEntries(model)
    for key, lead_in in (("12345", 0), ("67890", 2), ("13579", 1)):
        ids, _, _ = build_prompt(tiny_assets["tokenizer"], key, 500, lead_in=lead_in)
        want, got = model.new_memory(1), model.new_memory(1)
        fill_memory(model, want, ids)
        fill_memory(model, got, ids, entries)
        for a, b in zip(want.chronological(0), got.chronological(0)):
            assert torch.equal(a, b)
        assert got.num_pending(0) == want.num_pending(0)
    assert entries.hits >= 10  # later prompts reuse filler windows of earlier ones (14 of 39 windows here)


def test_backbone_mode_decodes_the_backbone_alone(checkpoint, tiny_assets):
    """The plain backbone behind the decoder: its cached greedy tokens are the backbone's own argmaxes."""
    model = LongMem.from_pretrained(checkpoint).eval()
    ids, _, _ = build_prompt(tiny_assets["tokenizer"], "12345", 20, lead_in=0)
    ctx = ids[-12:]
    out, (s,) = read_and_answer(PlainBackbone(model), ctx, [np.array([4, 4])], 3)
    ref = torch.as_tensor(ctx).view(1, -1)
    with torch.no_grad():
        for _ in range(3):
            ref = torch.cat([ref, model.backbone_logits(ref)[0, -1].argmax().view(1, 1)], 1)
        logp = torch.log_softmax(model.backbone_logits(torch.as_tensor(np.concatenate([ctx, [4, 4]])).view(1, -1))[0].double(), -1)
    assert out == ref[0, 12:].tolist()
    assert abs(s - float(logp[11, 4] + logp[12, 4])) < 1e-4


def test_cli_reports_accuracy_by_distance(checkpoint, cli, tmp_path, capsys):
    out = tmp_path / "pk.json"
    args = ["passkey", "--distances", "80", "160", "--trials", "2", "--candidates", "4", "--max-new-tokens", "5",
            "--model", checkpoint, "--device", "cpu", "--json", out, "--no-progress"]
    args.insert(1, "--full-context")
    assert cli(*args, "--plot", tmp_path / "pk.png") == 0
    assert "distance" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["chance_choice"] == 0.25 and r["segment_length"] == 64
    for d in ("80", "160"):
        assert r["by_distance"][d]["key_in_local_window"] == 0 and r["by_distance"][d]["actual_distance"] >= int(d)
        full = r["backbone_full"]["by_distance"][d]  # the whole prompt in the backbone's context, where it fits
        assert full["trials"] in (0, 2) and (full["trials"] == 0) == (full["accuracy_greedy"] is None)
        for mode in ("longmem", "no_memory", "backbone"):
            x = r[mode]["by_distance"][d]
            assert x["trials"] == 2 and x["accuracy_greedy"] in (0, 0.5, 1) and x["accuracy_choice"] in (0, 0.5, 1)
            assert x["key_logprob"] < 0
    assert (tmp_path / "pk.png").stat().st_size > 1000
    out2 = tmp_path / "pk2.json"
    assert cli(*args[:-3], "--json", out2, "--no-progress") == 0
    assert json.loads(out2.read_text()) == r  # deterministic for a seed
    capsys.readouterr()
    assert cli("passkey", "--distances", "0", "--model", checkpoint, "--device", "cpu") == 2
    assert "--distances must be positive" in capsys.readouterr().err
