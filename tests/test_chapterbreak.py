"""ChapterBreak: the data file, the book builder, and scoring that matches a hand computation."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from longmem import LongMem, LongMemConfig, LongMemError
from longmem.eval.chapterbreak import build_examples, find_chapters, load_chapterbreak, read_book
from longmem.tokens import encode
from longmem.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "chapterbreak_tiny.json"
BOOK = FIXTURES / "book_chapters.txt"


def test_load_reads_both_splits_in_file_order():
    ex = load_chapterbreak(DATA)
    assert [e.split for e in ex] == ["pg19", "ao3"] and [e.work for e in ex] == ["work-1", "work-2"]
    assert len(ex[0].candidates) == 6 and ex[0].candidates[0].startswith("The morning was fine")
    assert [e.split for e in load_chapterbreak(DATA, "ao3")] == ["ao3"]


@pytest.mark.parametrize("content, split, message", [
    ("{not json", "all", "not valid JSON"),
    ('{"pg19": {"w": [{"ctx": "a", "pos": "b"}]}}', "all", "lacks 'negs'"),
    ('{"pg19": {"w": [{"ctx": "a", "pos": "b", "negs": "c"}]}}', "all", "'negs' must be a non-empty list"),
    ('{"pg19": {"w": [{"ctx": " ", "pos": "b", "negs": ["c"]}]}}', "all", "empty ctx"),
    ('{"other": {}}', "all", "not in the ChapterBreak format"),
    ('{"pg19": {"w": []}}', "ao3", "no 'ao3' split"),
    ('{"pg19": {"w": []}}', "books", "unknown split"),
    ('{"pg19": {"w": []}, "ao3": {}}', "all", "no examples"),
])
def test_bad_files_are_one_line_errors(tmp_path, content, split, message):
    f = tmp_path / "cb.json"
    f.write_text(content)
    with pytest.raises(LongMemError, match=message):
        load_chapterbreak(f, split)


def test_cli_reports_accuracy_against_chance_for_three_modes(checkpoint, cli, tmp_path, capsys):
    out = tmp_path / "cb.json"
    assert cli("chapterbreak", "--data", DATA, "--model", checkpoint, "--device", "cpu", "--json", out,
               "--plot", tmp_path / "cb.png", "--no-progress") == 0
    r = json.loads(out.read_text())
    assert "chance" in capsys.readouterr().out
    for mode in ("longmem", "no_memory", "backbone"):
        assert r[mode]["chance"] == pytest.approx(1 / 6) and r[mode]["examples"] == 2
        assert set(r[mode]["by_split"]) == {"pg19", "ao3"}
        assert r[mode]["accuracy_sum"] in (0, 0.5, 1) and r[mode]["accuracy_mean"] in (0, 0.5, 1)
    for e in r["examples"]:  # every mode scored the same candidates after the same context
        assert e["memory_tokens"] > 0 and max(e["candidate_tokens"]) <= 8  # half the 16-token window
        assert len({len(e["scores"][m]["sum"]) for m in e["scores"]}) == 1
    assert (tmp_path / "cb.png").stat().st_size > 1000
    # a split that the file lacks, a missing file: one line each
    bad = tmp_path / "pg.json"
    bad.write_text('{"pg19": {}}')
    capsys.readouterr()
    assert cli("chapterbreak", "--data", bad, "--split", "ao3", "--model", checkpoint, "--device", "cpu") == 2
    assert cli("chapterbreak", "--data", tmp_path / "none.json", "--model", checkpoint) == 2
    assert cli("chapterbreak", "--data", DATA, "--split", "nope", "--model", checkpoint) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "no 'ao3' split" in err[0] and "does not exist" in err[1] and "unknown split" in err[2]


def test_reported_log_probability_equals_a_hand_computation(checkpoint, cli, tiny_assets, tmp_path):
    out = tmp_path / "cb.json"
    assert cli("chapterbreak", "--data", DATA, "--split", "pg19", "--model", checkpoint, "--device", "cpu",
               "--json", out, "--no-progress") == 0
    rec = json.loads(out.read_text())["examples"][0]
    ex = load_chapterbreak(DATA, "pg19")[0]
    model = LongMem.from_pretrained(checkpoint).eval()
    tok = tiny_assets["tokenizer"]
    ctx = encode(tok, ex.ctx.rstrip() + "\n\n")
    cand = encode(tok, ex.candidates[0].strip())[:8]
    m = rec["memory_tokens"]
    past, local = torch.as_tensor(ctx[:m]).view(1, -1), torch.as_tensor(ctx[m:]).view(1, -1)
    memory = model.new_memory(1)
    with torch.no_grad():
        for s in range(0, m, 16):  # the model's own write path: read, then write each segment
            model(past[:, s:s + 16], memory=memory)
        assert memory.num_tokens(0) == min(m, 128) and memory.num_pending(0) == 0  # whole chunks only
        ids = torch.cat([local, torch.as_tensor(cand).view(1, -1)], dim=1)
        for mode, logits in [("longmem", model(ids, memory=memory, update_memory=False).logits),
                             ("backbone", model.backbone.model(ids).logits)]:
            logp = torch.log_softmax(logits[0].double(), -1)
            n = local.shape[1]
            want = sum(logp[n - 1 + i, int(t)].item() for i, t in enumerate(cand))
            assert math.isclose(rec["scores"][mode]["sum"][0], want, rel_tol=1e-5)
            assert math.isclose(rec["scores"][mode]["mean"][0], want / len(cand), rel_tol=1e-5)
    assert memory.num_tokens(0) == min(m, 128)  # candidates were not written


def test_builder_uses_later_chapters_and_no_headings():
    text = BOOK.read_text()
    starts, bodies = find_chapters(text)
    assert len(bodies) == 8 and all("CHAPTER" not in b and "VOLUME" not in b for b in bodies)
    ex = build_examples(text, candidate_words=12, context_chars=300, seed=3)
    assert len(ex) == 2  # boundaries before chapters II and III have five later chapters
    for j, e in enumerate(ex, start=1):
        assert e["pos"] == " ".join(bodies[j].split()[:12])  # one-line prose, so words survive joining
        later = {" ".join(b.split()[:12]) for b in bodies[j + 1:]}
        assert len(e["negs"]) == 5 and set(e["negs"]) <= later
        assert len(e["ctx"]) <= 300 and not e["ctx"].rstrip().endswith(f"CHAPTER {'I' * (j + 1)}")
        assert "VOLUME" not in e["pos"] + "".join(e["negs"])
    assert build_examples(text, seed=3) == build_examples(text, seed=3)
    with pytest.raises(LongMemError, match="chapter headings"):
        build_examples("no chapters here\n" * 50)


def test_build_cli_from_austen_corpus_and_evaluate(checkpoint, cli, tmp_path, capsys):
    books = tmp_path / "data" / "books"
    books.mkdir(parents=True)
    (books / "test.jsonl").write_text(json.dumps({"id": "Emma", "text": BOOK.read_text()}) + "\n")
    out = tmp_path / "emma_cb.json"
    assert cli("chapterbreak-build", "--book", "austen:Emma", "--data-root", tmp_path / "data", "--out", out,
               "--candidate-words", "10", "--seed", "1") == 0
    built = json.loads(out.read_text())
    assert set(built) == {"pg19", "ao3"} and len(built["pg19"]["Emma"]) == 2 and built["ao3"] == {}
    again = tmp_path / "again.json"
    assert cli("chapterbreak-build", "--book", BOOK, "--out", again, "--candidate-words", "10", "--seed", "1") == 0
    assert json.loads(again.read_text())["pg19"]["book_chapters.txt"] == built["pg19"]["Emma"]  # deterministic
    assert cli("chapterbreak", "--data", out, "--split", "pg19", "--model", checkpoint, "--device", "cpu", "--no-progress") == 0
    capsys.readouterr()
    assert cli("chapterbreak-build", "--book", "austen:Nobody", "--data-root", tmp_path / "data", "--out", out) == 2
    assert "no novel 'Nobody'" in capsys.readouterr().err


def test_read_book_picks_a_document_from_jsonl(tmp_path):
    f = tmp_path / "books.jsonl"
    f.write_text(json.dumps({"id": "A", "text": "x"}) + "\n" + json.dumps({"id": "B", "text": "y"}) + "\n")
    assert read_book(str(f), "B") == ("B", "y")
    with pytest.raises(LongMemError, match="choose one with --id"):
        read_book(str(f))


def test_a_baseline_with_its_own_memory_is_scored_through_its_own_forward(tiny_assets):
    from longmem.baselines import CoupledMemoryLM
    from longmem.eval.chapterbreak import evaluate_chapterbreak
    from longmem.eval.scoring import fill_memory

    cfg = LongMemConfig(chunk_size=2, memory_size=128, topk_chunks=4, segment_length=16)
    model = CoupledMemoryLM.from_backbone(tiny_assets["backbone"], cfg).eval()
    memory = model.new_memory(3)
    fill_memory(model, memory, np.arange(40) % 50)
    assert [memory.num_tokens(b) for b in range(3)] == [40, 40, 40]
    r = evaluate_chapterbreak(model, tiny_assets["tokenizer"], load_chapterbreak(DATA))
    assert r["longmem"]["examples"] == 2 and r["longmem"]["chance"] == pytest.approx(1 / 6)
    assert r["examples"][0]["scores"]["longmem"] != r["examples"][0]["scores"]["no_memory"]
