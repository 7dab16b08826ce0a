"""Named persistent memories: add/list/show/remove, generate, persistence across processes, atomicity,
locking, isolation and name validation."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from longmem import LongMem, LongMemError
from longmem.cli import main
from longmem.store import MemoryStore, check_name, read_pieces


def run(*args, home):
    return main([*args, "--home", str(home)])


def cli(args, home, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "longmem.cli", *args, "--home", str(home)], env=env,
                          capture_output=True, text=True, **kw)


@pytest.fixture
def book(tiny_assets):
    return sorted(tiny_assets["train"].iterdir())[0]


def test_add_list_show_append_remove(tiny_checkpoint, book, tmp_path, capsys):
    home = tmp_path / "home"
    assert run("memory", "add", "novel", str(book), "--model", str(tiny_checkpoint), "--no-progress",
               "--memory-size", "4096", home=home) == 0
    store = MemoryStore(home)
    first = store.header("novel")["rows"][0]
    assert first["tokens"] > 0 and len(first["sources"]) == 1
    assert run("memory", "add", "novel", str(book), "--model", str(tiny_checkpoint), "--no-progress", home=home) == 0
    again = store.header("novel")["rows"][0]
    assert again["tokens"] + again["pending"] == 2 * (first["tokens"] + first["pending"])  # appended
    capsys.readouterr()
    assert run("memory", "list", home=home) == 0
    assert "novel" in capsys.readouterr().out
    assert run("memory", "show", "novel", "--json", home=home) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tokens"] == again["tokens"] and shown["bytes"] > 0 and len(shown["sources"]) == 2
    assert shown["fingerprint"] == LongMem.from_pretrained(tiny_checkpoint).memory_info()["fingerprint"]
    assert run("memory", "remove", "novel", home=home) == 0
    assert store.names() == []


def test_memory_reloaded_in_a_new_process_gives_the_same_generation(tiny_checkpoint, book, tmp_path):
    home = tmp_path / "home"
    assert run("memory", "add", "m", str(book), "--model", str(tiny_checkpoint), "--no-progress", home=home) == 0
    model = LongMem.from_pretrained(tiny_checkpoint).eval()
    bank = MemoryStore(home).load("m", model)
    from longmem.loading import load_tokenizer

    tok = load_tokenizer(str(tiny_checkpoint / "backbone"))
    prompt = "alpha beta gamma"
    ids = torch.tensor([tok.backend_tokenizer.encode(prompt, add_special_tokens=False).ids])
    here = tok.decode(model.generate(ids, memory=bank, max_new_tokens=12)[0, ids.shape[1]:].tolist())
    r = cli(["generate", "--model", str(tiny_checkpoint), "--memory", "m", "--prompt", prompt, "--max-new-tokens", "12"], home, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n") == prompt + here
    without = cli(["generate", "--model", str(tiny_checkpoint), "--memory", "m", "--no-memory", "--prompt", prompt,
                   "--max-new-tokens", "12"], home, timeout=120)
    assert without.returncode == 0


def test_prompt_file_and_stdin_give_the_prompts_generation(tiny_checkpoint, book, tmp_path, capsys, monkeypatch):
    import io

    home = tmp_path / "home"
    assert run("memory", "add", "m", str(book), "--model", str(tiny_checkpoint), "--no-progress", home=home) == 0
    prompt = "alpha beta\n    gamma \u00e9 delta"  # several lines, non-ASCII: read exactly as written
    gen = ("generate", "--model", str(tiny_checkpoint), "--memory", "m", "--max-new-tokens", "10")
    capsys.readouterr()
    assert run(*gen, "--prompt", prompt, home=home) == 0
    direct = capsys.readouterr().out
    assert direct.startswith(prompt) and len(direct) > len(prompt) + 1
    f = tmp_path / "prompt.txt"
    f.write_text(prompt, encoding="utf-8")
    assert run(*gen, "--prompt-file", str(f), home=home) == 0
    assert capsys.readouterr().out == direct
    monkeypatch.setattr("sys.stdin", io.StringIO(prompt))
    assert run(*gen, "--prompt-file", "-", home=home) == 0
    assert capsys.readouterr().out == direct


def test_a_killed_add_leaves_the_previous_memory_intact(tiny_checkpoint, book, tmp_path):
    home = tmp_path / "home"
    assert run("memory", "add", "m", str(book), "--model", str(tiny_checkpoint), "--no-progress", home=home) == 0
    store = MemoryStore(home)
    before = store.path("m").read_bytes()
    big = tmp_path / "big.txt"
    big.write_text(book.read_text() * 60)
    for delay in (0.5, 1.5, 3.0):  # kill at several moments of the add
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        p = subprocess.Popen([sys.executable, "-m", "longmem.cli", "memory", "add", "m", str(big), "--model",
                              str(tiny_checkpoint), "--no-progress", "--home", str(home)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        now = store.path("m").read_bytes()
        sources = store.header("m")["rows"][0]["sources"]
        # either untouched, or a complete new memory that records the finished add
        assert now == before or [s["file"] for s in sources][-1] == str(big.resolve())
        store.load("m", LongMem.from_pretrained(tiny_checkpoint))  # loads, whole
        before = now


def test_a_second_writer_is_refused_cleanly(tiny_checkpoint, book, tmp_path, capsys):
    home = tmp_path / "home"
    store = MemoryStore(home)
    with store.lock("m"):
        assert run("memory", "add", "m", str(book), "--model", str(tiny_checkpoint), "--no-progress", home=home) == 2
    err = capsys.readouterr().err
    assert "being written" in err and "Traceback" not in err
    assert not store.exists("m")


@pytest.mark.parametrize("name", ["../x", "a/b", "", ".hidden", "x" * 65, "a..b", "/etc/passwd", "na me", "..", "c:\\x"])
def test_adversarial_names_are_refused(name, tiny_checkpoint, book, tmp_path, capsys):
    home = tmp_path / "home"
    with pytest.raises(LongMemError, match="invalid memory name"):
        check_name(name)
    assert run("memory", "add", name, str(book), "--model", str(tiny_checkpoint), home=home) == 2
    assert "invalid memory name" in capsys.readouterr().err
    assert not any(tmp_path.rglob("*.safetensors"))


def test_memories_are_isolated(tiny_checkpoint, tiny_assets, tmp_path):
    """A memory holds exactly what was added to it: its keys are those of its own file, nothing else."""
    home = tmp_path / "home"
    a, b = sorted(tiny_assets["train"].iterdir())[:2]
    assert run("memory", "add", "A", str(a), "--model", str(tiny_checkpoint), "--no-progress", home=home) == 0
    assert run("memory", "add", "B", str(b), "--model", str(tiny_checkpoint), "--no-progress", home=home) == 0
    model = LongMem.from_pretrained(tiny_checkpoint)
    store = MemoryStore(home)
    alone = model.new_memory(1)
    from longmem.loading import load_tokenizer
    from longmem.store import ingest_file

    ingest_file(model, load_tokenizer(str(tiny_checkpoint / "backbone")), alone, a)
    got = store.load("A", model)
    assert torch.equal(got.chronological(0)[0], alone.chronological(0)[0])
    other = store.load("B", model).chronological(0)[0]
    assert not torch.equal(other[:, :5], got.chronological(0)[0][:, :5])


def test_bad_files_change_nothing(tiny_checkpoint, book, tmp_path, capsys):
    home = tmp_path / "home"
    assert run("memory", "add", "m", str(book), "--model", str(tiny_checkpoint), "--no-progress", home=home) == 0
    before = MemoryStore(home).path("m").read_bytes()
    empty, binary = tmp_path / "e.txt", tmp_path / "b.bin"
    empty.write_text("")
    binary.write_bytes(b"\x7fELF\x00\x00")
    for f, needle in ((empty, "empty"), (binary, "binary"), (tmp_path / "nope.txt", "not a file")):
        assert run("memory", "add", "m", str(book), str(f), "--model", str(tiny_checkpoint), home=home) == 2
        assert needle in capsys.readouterr().err
    assert MemoryStore(home).path("m").read_bytes() == before
    assert run("generate", "--memory", "nothere", "--prompt", "x", "--model", str(tiny_checkpoint), home=home) == 2
    assert "no memory named" in capsys.readouterr().err


def test_read_pieces_streams_the_whole_file(tmp_path):
    f = tmp_path / "t.txt"
    text = "".join(f"line {i} é\n" for i in range(5000)) + "tail"
    f.write_text(text)
    pieces = list(read_pieces(f, size=1000))
    assert "".join(pieces) == text and len(pieces) > 10


def test_chat_remembers_the_conversation(tiny_checkpoint, tmp_path):
    home = tmp_path / "home"
    r = cli(["chat", "--memory", "talk", "--remember", "--model", str(tiny_checkpoint), "--max-new-tokens", "8"], home,
            input="my name is Zebediah\nwhat is my name\n\n", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Reply: ") == 2
    h = MemoryStore(home).header("talk")["rows"][0]
    assert h["tokens"] + h["pending"] > 10 and h["sources"][0]["file"] == "chat"


def test_an_ivf_memory_is_built_kept_and_shown(tiny_checkpoint, book, tmp_path, capsys):
    home = tmp_path / "home"
    # chunk 1 and a 4096-token memory: nlist 64, trained once 39 * 64 = 2,496 chunks are stored
    assert run("memory", "add", "big", str(book), str(book), "--model", str(tiny_checkpoint), "--no-progress",
               "--memory-size", "4096", "--chunk-size", "1", "--index", "ivf", "--nprobe", "4", home=home) == 0
    capsys.readouterr()
    assert run("memory", "show", "big", "--json", home=home) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["index"] == "ivf (nlist 64, nprobe 4)"
    model = LongMem.from_pretrained(tiny_checkpoint)
    bank = MemoryStore(home).load("big", model)
    assert (bank.index, bank.nprobe) == ("ivf", 4) and bank.num_tokens(0) >= bank.ivf_min_chunks
    assert 0 in bank.centroids  # trained when `memory add` saved it: every later load searches the same clusters
    ids = torch.randint(0, 100, (1, 16))
    flat = MemoryStore(home).load("big", model)
    flat.index = "flat"
    assert not torch.equal(model(ids, memory=bank, update_memory=False).logits, model(ids, memory=flat, update_memory=False).logits)
    bank.nprobe = bank.nlist  # scanning every cluster: the ivf memory reads exactly what the flat one does
    assert torch.equal(model(ids, memory=bank, update_memory=False).logits, model(ids, memory=flat, update_memory=False).logits)
