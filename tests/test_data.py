"""Corpora, document readers and the BPE tokenizer, on tiny fixtures made in tmp_path."""

import gzip
import hashlib
import json
import os
import struct
import sys
import types
import zlib

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

from longmem.data import corpora as D  # noqa: E402
from longmem.cli import main  # noqa: E402
from longmem.errors import LongMemError  # noqa: E402


# --------------------------------------------------------------------------- fixtures


def make_austen_rdata(folder, novels: dict[str, list[str]]):
    """Write an R lazy-load database like janeaustenr's data/: Rdata.rdb + Rdata.rdx."""
    import rdata

    folder.mkdir(parents=True, exist_ok=True)
    blob, index = b"", {}
    for name, lines in novels.items():
        tmp = folder / "entry.rds"
        rdata.write_rds(tmp, np.array(lines), compression=None)
        raw = tmp.read_bytes()
        tmp.unlink()
        entry = struct.pack(">i", len(raw)) + zlib.compress(raw)
        index[name] = np.array([len(blob), len(entry)], dtype=np.int32)
        blob += entry
    (folder / "Rdata.rdb").write_bytes(blob)
    rdata.write_rds(folder / "Rdata.rdx", {"variables": index, "references": {}},
                    compression="gzip")
    return folder


@pytest.fixture
def austen_dir(tmp_path):
    novels = {name: ["", "", title.upper(), "", f"Chapter 1 of {title}.", "The end."]
              for name, (title, _) in D.AUSTEN_NOVELS.items()}
    return make_austen_rdata(tmp_path / "janeaustenr" / "data", novels)


@pytest.fixture
def fake_stdlib(tmp_path):
    root = tmp_path / "stdlib"
    big = "x = 1\n" * 4000  # 24 KB
    files = {
        "alpha.py": big, "pkg/beta.py": big, "pkg/gamma.py": big, "small.py": "y = 2\n",
        "test/test_alpha.py": big, "site-packages/thing.py": big, "idlelib/editor.py": big,
        "data.txt": big,
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


# --------------------------------------------------------------------------- iter_documents


def test_iter_documents_text_file_and_utf8_replace_policy(tmp_path):
    f = tmp_path / "a.txt"
    f.write_bytes("héllo\n".encode() + b"\xff bad byte\n")
    (doc,) = D.iter_documents(f)
    assert doc.id == "a.txt"
    assert doc.text == "héllo\n\ufffd bad byte\n"


def test_iter_documents_folder_is_recursive_sorted_and_skips_binary_and_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("zed")
    (tmp_path / "a.py").write_text("print(1)")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\0\0\0binary")
    (tmp_path / ".hidden.txt").write_text("secret")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"id": "r1", "text": "row one"}) + "\n")
    docs = list(D.iter_documents(tmp_path))
    assert [(d.id, d.text) for d in docs] == [("a.py", "print(1)"), ("b/z.md", "zed"),
                                             ("r1", "row one")]


def test_iter_documents_jsonl_ids_default_to_line_numbers(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"id": 7, "text": "two"}) + "\n")
    assert [(d.id, d.text) for d in D.iter_documents(f)] == [("docs.jsonl:1", "one"), ("7", "two")]


@pytest.mark.parametrize("content, match", [
    ("not json\n", "not valid JSON"),
    (json.dumps({"body": "x"}) + "\n", '"text" field'),
])
def test_iter_documents_bad_jsonl(tmp_path, content, match):
    f = tmp_path / "bad.jsonl"
    f.write_text(content)
    with pytest.raises(LongMemError, match=match):
        list(D.iter_documents(f))


def test_iter_documents_rejects_missing_binary_and_empty_folder(tmp_path):
    with pytest.raises(LongMemError, match="does not exist"):
        list(D.iter_documents(tmp_path / "nope.txt"))
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"abc\0def")
    with pytest.raises(LongMemError, match="looks binary"):
        list(D.iter_documents(binary))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "only.bin").write_bytes(b"\0\0")
    with pytest.raises(LongMemError, match="holds no text files"):
        list(D.iter_documents(empty))


def test_iter_documents_hf_through_datasets(monkeypatch):
    calls = []

    class FakeDataset(list):
        column_names = ["text", "label"]

    def load_dataset(name, split):
        calls.append((name, split))
        return FakeDataset([{"text": "first", "label": 0}, {"text": "second", "label": 1}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = list(D.iter_documents("hf:someone/books:validation"))
    assert calls == [("someone/books", "validation")]
    assert [(d.id, d.text) for d in docs] == [("someone/books:validation:0", "first"),
                                             ("someone/books:validation:1", "second")]
    list(D.iter_documents("hf:plain"))
    assert calls[-1] == ("plain", "train")


def test_iter_documents_hf_errors(monkeypatch):
    def offline(name, split):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(LongMemError, match="could not load HuggingFace dataset 'x/y'"):
        list(D.iter_documents("hf:x/y"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(LongMemError, match="pip install datasets"):
        list(D.iter_documents("hf:x/y"))


def test_text_pieces_cut_after_newlines_and_rejoin_exactly():
    text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(500))
    pieces = list(D.text_pieces(text, piece_chars=200))
    assert "".join(pieces) == text
    assert len(pieces) > 10
    assert all(p.endswith("\n") for p in pieces[:-1])
    assert all(len(p) <= 200 for p in pieces)


# --------------------------------------------------------------------------- corpora


def test_read_austen_rdata_decodes_novels_and_strips_leading_blank_lines(austen_dir):
    novels = D.read_austen_rdata(austen_dir)
    assert set(novels) == set(D.AUSTEN_NOVELS)
    assert novels["emma"] == "EMMA\n\nChapter 1 of Emma.\nThe end."


def test_read_austen_rdata_errors(tmp_path, austen_dir):
    with pytest.raises(LongMemError, match="Rdata.rdx is missing"):
        D.read_austen_rdata(tmp_path)
    (austen_dir / "Rdata.rdb").write_bytes(b"garbage")
    with pytest.raises(LongMemError, match="could not decode"):
        D.read_austen_rdata(austen_dir)


def test_austen_split_is_by_whole_novel(austen_dir):
    splits = D.austen_splits(D.read_austen_rdata(austen_dir))
    assert [d.id for d in splits["train"]] == ["Sense and Sensibility", "Pride and Prejudice",
                                              "Mansfield Park", "Northanger Abbey"]
    assert [d.id for d in splits["validation"]] == ["Persuasion"]
    assert [d.id for d in splits["test"]] == ["Emma"]
    with pytest.raises(LongMemError, match="lacks novels"):
        D.austen_splits({"emma": "text"})


def test_code_split_is_the_documented_hash_rule():
    for rel in ["json/decoder.py", "typing.py", "email/_header_value_parser.py"]:
        bucket = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 100
        expected = "train" if bucket < 90 else "validation" if bucket < 95 else "test"
        assert D.code_split(rel) == expected
    counts = {s: 0 for s in D.SPLITS}
    for i in range(2000):
        counts[D.code_split(f"m{i}.py")] += 1
    assert 1700 < counts["train"] < 1900 and counts["validation"] > 50 and counts["test"] > 50


def test_code_splits_keeps_large_library_files_only(fake_stdlib):
    splits = D.code_splits(fake_stdlib)
    ids = sorted(d.id for docs in splits.values() for d in docs)
    assert ids == ["alpha.py", "pkg/beta.py", "pkg/gamma.py"]
    for split, docs in splits.items():
        assert all(D.code_split(d.id) == split for d in docs)
    with pytest.raises(LongMemError, match="no .py files"):
        D.code_splits(fake_stdlib, min_bytes=10**9)


def test_cli_data_writes_deterministic_corpora_with_manifest(tmp_path, austen_dir, fake_stdlib,
                                                             capsys):
    outs = []
    for run in range(2):
        out = tmp_path / f"out{run}"
        assert main(["data", "all", "--out", str(out), "--austen-dir", str(austen_dir),
                     "--stdlib", str(fake_stdlib)]) == 0
        outs.append(out)
    for corpus in ("books", "code"):
        for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "manifest.json"):
            a, b = (o / corpus / name for o in outs)
            assert a.read_bytes() == b.read_bytes()
        manifest = json.loads((outs[0] / corpus / "manifest.json").read_text())
        for split, counts in manifest["splits"].items():
            docs = list(D.iter_documents(outs[0] / corpus / f"{split}.jsonl"))
            assert counts["documents"] == len(docs)
            assert counts["characters"] == sum(len(d.text) for d in docs)
    assert not list(outs[0].rglob("*.tmp"))
    (emma,) = D.iter_documents(outs[0] / "books" / "test.jsonl")
    assert emma.id == "Emma" and emma.text.startswith("EMMA")
    assert "books: train 4 docs" in capsys.readouterr().out


def test_cli_data_bad_input_is_one_line(tmp_path, capsys):
    assert main(["data", "code", "--stdlib", str(tmp_path / "missing"), "--out",
                 str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longmem data: error:") and err.count("\n") == 1


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    corpus = tmp_path / "train.jsonl"
    texts = ["It is a truth universally acknowledged, that a single man\n",
             "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"]
    corpus.write_text("".join(json.dumps({"text": t * 20}) + "\n" for t in texts))
    out = tmp_path / "tok"
    assert main(["tokenizer", "--data", str(corpus), "--vocab-size", "320", "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 320
    assert tok.eos_token == tok.bos_token == tok.pad_token == D.EOT
    assert tok.eos_token_id == 0
    sample = "Émile wrote: a single fib(n) — ✓\n\tdone"  # unseen characters: byte fallback
    ids = tok(sample)["input_ids"]
    assert tok.decode(ids) == sample
    assert len(tok("a single man")["input_ids"]) < len("a single man")  # merges were learned
    assert not (tmp_path / ".tok.tmp").exists()


def test_tokenizer_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(LongMemError, match="no text"):
        D.train_tokenizer([empty], 300)
    with pytest.raises(LongMemError, match="too small"):
        D.train_tokenizer([empty], 100)
