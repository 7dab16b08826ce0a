"""The copy-training corpora and the copy evaluation (longmem.data.recall, `longmem data recall`,
longmem.eval.memory_copy).

What these promise is what the RESULTS.md figures rest on: every made-up line appears exactly twice, the
repeat lies far enough back that only the memory holds the original, and the evaluation scores the right tokens.
"""

import json
import random
import re

from longmem.cli import main
from longmem.data import recall as mrc
from longmem.eval import memory_copy as mce

MADE_UP = re.compile(r"^[a-z_]+ = [a-z_]+\([a-z_]+, \d+\)$")
CODE = "".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))  # ~14K characters


def test_made_up_lines_look_like_code_and_differ():
    rng = random.Random(0)
    lines = [mrc.made_up_line(rng) for _ in range(200)]
    assert all(MADE_UP.match(line) for line in lines)
    assert len(set(lines)) == 200


def test_random_lines_appear_twice_the_repeat_beyond_min_back():
    rng = random.Random(3)
    pieces = list(mrc.augment(CODE, rng, piece_chars=6000, passages=2, passage_chars=300, min_back=1500, random_lines=4))
    assert len(pieces) == 3  # 14,580 characters
    for piece in pieces:
        made_up = set(line for line in piece.split("\n") if MADE_UP.match(line))
        assert len(made_up) == 4
        for line in made_up:  # inserted once, copied once (a copied natural passage may hold it too)
            assert piece.count(line) >= 2
            assert piece.rindex(line) - piece.index(line) >= 1500
    short = list(mrc.augment(CODE[:1700], rng, piece_chars=6000, passages=2, passage_chars=300, min_back=1500,
                             random_lines=4))
    assert short == [CODE[:1700]]  # too short to hold a copy a window back: left as it is


def test_no_random_lines_leaves_the_old_corpus_unchanged(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "text": CODE}) + "\n")
    out = tmp_path / "out.jsonl"
    mrc.write_recall_corpus([src], out, 6000, 2, 300, 1500, seed=0)
    rows = [json.loads(line) for line in open(out)]
    assert [r["id"] for r in rows] == ["a#0", "a#1", "a#2"]
    assert not any(MADE_UP.match(line) for r in rows for line in r["text"].split("\n"))
    assert rows[0]["text"].startswith(CODE[:6000] + "\n\n")


def test_dense_documents(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "text": CODE}) + "\n")
    out = tmp_path / "dense.jsonl"
    n, chars = mrc.write_dense_corpus([src], out, documents=3, lines=25, seed=0)
    rows = [json.loads(line)["text"] for line in open(out)]
    assert n == 3 and chars == sum(map(len, rows))
    for text in rows:
        lines = text.split("\n")
        made_up = [i for i, line in enumerate(lines) if MADE_UP.match(line)]
        assert len(made_up) == 50
        first, second = made_up[:25], made_up[25:]
        assert sorted(lines[i] for i in first) == sorted(lines[i] for i in second)
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line) + 1)  # character offset of each line
        assert starts[second[0]] - starts[first[-1] + 1] >= 1500  # the code between the two blocks


def test_memory_copy_eval_pieces_point_at_both_occurrences():
    rng = random.Random(1)
    text, repeats = mce.build_piece(CODE[:8000], rng, lines=3, min_back=3000)
    assert len(repeats) == 3
    for orig, rep, line in repeats:
        assert text[orig:orig + len(line)] == line and text[rep:rep + len(line)] == line
        assert text[orig - 1] == "\n" and text[orig + len(line)] == "\n"
        assert rep - orig >= 3000


def test_cli_writes_the_same_corpus_as_the_library(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "text": CODE}) + "\n")
    lib, cli = tmp_path / "lib.jsonl", tmp_path / "cli.jsonl"
    n, chars = mrc.write_recall_corpus([src], lib, 6000, 2, 300, 1500, seed=4, random_lines=3)
    assert main(["data", "recall", str(src), "--out", str(cli), "--piece-chars", "6000", "--passages", "2",
                 "--passage-chars", "300", "--min-back", "1500", "--random-lines", "3", "--seed", "4"]) == 0
    assert cli.read_text() == lib.read_text()
    assert capsys.readouterr().out == f"{n} documents, {chars:,} characters -> {cli}\n"
    dense = tmp_path / "dense.jsonl"
    assert main(["data", "recall", str(src), "--out", str(dense), "--dense", "2", "--dense-lines", "5"]) == 0
    assert len(dense.read_text().splitlines()) == 2


def test_cli_dense_without_long_documents_is_one_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"id": "a", "text": "short"}) + "\n")
    assert main(["data", "recall", str(src), "--out", str(tmp_path / "o.jsonl"), "--dense", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longmem data: error: no document longer than 4,000 characters") and err.count("\n") == 1
