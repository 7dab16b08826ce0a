"""Planted facts: the facts are in the text, in order, beyond the window; the report's shape; bad input."""

import json

import pytest

from longmem import LongMem, LongMemConfig
from longmem.eval.facts import FACTS, plant


def story(n: int = 3000) -> str:
    words = ["the", "garden", "was", "quiet", "and", "Emma", "walked", "slowly", "towards", "house", "while", "rain"]
    return " ".join(words[(i * 7) % len(words)] + ("." if i % 11 == 10 else "") for i in range(n))


@pytest.fixture(scope="module")
def checkpoint(tiny_assets, tmp_path_factory):
    """Overrides conftest's: a question alone is tens of tokens of the tiny tokenizer."""
    path = tmp_path_factory.mktemp("facts") / "ckpt"
    cfg = LongMemConfig(chunk_size=2, memory_size=8192, topk_chunks=4, segment_length=128)
    LongMem.from_backbone(tiny_assets["backbone"], cfg).save_pretrained(path, save_backbone=True, tokenizer=tiny_assets["tokenizer"])
    return path


def test_facts_are_planted_in_order_at_increasing_depths(tiny_assets):
    tok = tiny_assets["tokenizer"]
    ids, starts = plant(tok, story(), 1500)
    text = tok.decode(ids.tolist())
    at = [text.find(sentence.strip()) for sentence, _, _ in FACTS]
    assert min(at) > 0 and at == sorted(at)
    assert starts == sorted(starts) and starts[-1] < len(ids)


def test_cli_reports_each_fact_in_each_mode(checkpoint, cli, tmp_path, capsys):
    text = tmp_path / "story.txt"
    text.write_text(story())
    out = tmp_path / "facts.json"
    assert cli("facts", "--text", text, "--tokens", "1500", "--model", checkpoint, "--json", out, "--no-progress") == 0
    assert "right:" in capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r["of"] == len(FACTS) == len(r["facts"])
    for mode in ("longmem", "no_memory", "backbone"):
        assert r[mode] == sum(row[mode]["right"] for row in r["facts"])
    assert all(row["distance"] > r["segment_length"] for row in r["facts"][:-1])  # beyond the window


def test_too_few_tokens_and_missing_file_are_one_line_errors(checkpoint, cli, tmp_path, capsys):
    assert cli("facts", "--text", tmp_path / "missing.txt", "--model", checkpoint) == 2
    assert cli("facts", "--text", __file__, "--tokens", "10", "--model", checkpoint) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("longmem eval: error:") for line in err)
