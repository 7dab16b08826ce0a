"""Crash safety: SIGKILL `longmem train` and `longmem memory add` at random moments, again and again.

Each test runs the real command in a subprocess, kills it (SIGKILL, only the process it started) at a
seeded random moment of one of these kinds, then starts it again, until the work is done:

    start-up          a random time before the process has done anything (imports, loading, encoding)
    mid-step          while training steps / reading the file: after 1-2 new steps or once the file is
                      open, plus a random fraction of a step
    checkpoint write  the moment the atomic write begins (OUT/checkpoint.tmp or NAME.safetensors.tmp-PID
                      appears), plus 0-10 ms
    checkpoint swap   training only: the moment OUT/checkpoint.old appears (between the two renames)

After every kill: the last checkpoint / the memory loads and verifies (checksums), nothing the command
reported saved is lost (metrics.jsonl's ``checkpoint`` records; `memory add`'s closing line), and the
next start resumes from it. At the end the interrupted training run's weights equal an uninterrupted
run's with the same seed (resume is exact), and the memory equals one built without interruptions.

Quick mode (what CI runs) kills each command 5 times, about a minute for the file on 2 cores (a kill aimed at a
checkpoint write too quick to catch lands just after it). More:

    LONGMEM_KILLS=100 .venv/bin/python -m pytest tests/test_crash.py -s      # 100 kills of each command
    LONGMEM_KILL_SEED=7 ...                                                   # other random moments (default 0)

Each test prints how many kills it survived and where they landed ("[crash] ...").
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.testing import assert_close

from longmem import LongMem
from longmem.cli import main
from longmem.store import MemoryStore
from longmem.training.train import find_checkpoint

KILLS = int(os.environ.get("LONGMEM_KILLS", "5"))
SEED = int(os.environ.get("LONGMEM_KILL_SEED", "0"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
LAUNCH_TIMEOUT = 300  # seconds one start may take before the test gives up on it


def launch(args, env=ENV):
    return subprocess.Popen([sys.executable, "-m", "longmem.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when(proc, ready, then: float = 0.0, poll: float = 0.001) -> bool:
    """Wait until ``ready()`` holds, sleep ``then`` seconds, SIGKILL ``proc``. False if it exited first."""
    deadline = time.time() + LAUNCH_TIMEOUT
    while not ready():
        if proc.poll() is not None:
            return False
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("the process neither reached the kill moment nor finished")
        time.sleep(poll)
    time.sleep(then)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)  # our own child, by its pid
    proc.wait()
    return True


def report(capsys, line: str) -> None:
    with capsys.disabled():
        print(f"\n[crash] {line}")


# -- longmem train ---------------------------------------------------------------------------------

TINY = ["--batch-size", "2", "--segment-length", "16", "--memory-size", "128", "--chunk-size", "2",
        "--topk-chunks", "4", "--lr", "3e-3", "--precision", "fp32", "--no-progress", "--eval-every", "0",
        "--save-every", "2", "--seed", "3"]


def identity(path: Path):
    """Which directory sits at ``path`` (None: none): inode and change time, so a new one is told from a leftover."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_ctime_ns


def records(out: Path) -> list[dict]:
    """metrics.jsonl's records (a line still being written by the running process is left for later)."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in open(path) if line.endswith("\n") and line.strip()] if path.is_file() else []


def test_train_survives_random_kills_and_ends_where_an_uninterrupted_run_ends(tiny_assets, tmp_path, capsys):
    a = tiny_assets
    max_steps = 12 + 3 * KILLS  # a kill lands at most ~3 steps after the resumed step: the run outlasts the kills

    def args(out):
        return ["train", "--backbone", a["backbone"], "--data", a["train"], "--out", out, "--max-steps", max_steps, *TINY]

    reference = tmp_path / "reference"
    assert main([str(x) for x in args(reference)]) == 0

    rng = random.Random(SEED)
    out = tmp_path / "killed"
    kinds = Counter()
    startup_s, step_s = 3.0, 0.05  # first guesses, then what the runs show
    launches = 0
    while True:
        resumed_from = find_checkpoint(out)
        # a start without a checkpoint begins at step 1 and rewrites metrics.jsonl: its new records start at line 0
        before = records(out) if resumed_from else []
        saved_before = max((r["step"] for r in before if "checkpoint" in r), default=0)
        resumed_step = torch.load(resumed_from / "trainer.pt", weights_only=False)["step"] if resumed_from else 0
        tmp, old = out / "checkpoint.tmp", out / "checkpoint.old"
        leftover = {tmp: identity(tmp), old: identity(old)}  # what an earlier kill left: not this start's doing
        fresh = lambda p: identity(p) not in (None, leftover[p])  # noqa: E731
        t0 = time.time()
        proc = launch(args(out) + (["--resume"] if launches else []))
        launches += 1
        new_steps = lambda: [r for r in records(out)[len(before):] if "loss" in r]  # noqa: E731
        saved_now = lambda: max((r["step"] for r in records(out)[len(before):] if "checkpoint" in r), default=0)  # noqa: E731
        kind = "finish" if sum(kinds.values()) >= KILLS else ["start-up", "mid-step", "checkpoint write",
                                                              "checkpoint swap"][rng.randrange(4)]
        if kind == "start-up":
            killed = kill_when(proc, lambda: True, then=rng.uniform(0, startup_s))
        elif kind == "mid-step":
            want = rng.randint(1, 2)
            killed = kill_when(proc, lambda: len(new_steps()) >= want, then=rng.uniform(0, step_s), poll=0.005)
            startup_s = 0.5 * startup_s + 0.5 * (time.time() - t0)  # learn how long start-up takes here
        elif kind == "checkpoint write":  # or, if the write was too quick to catch, just after it
            killed = kill_when(proc, lambda: fresh(tmp) or saved_now() > saved_before, then=rng.uniform(0, 0.01))
        elif kind == "checkpoint swap":
            killed = kill_when(proc, lambda: fresh(old) or saved_now() > saved_before)
        else:  # enough kills: let it finish
            killed = False
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
        if not killed:
            assert proc.returncode == 0, stderr[-3000:]
            break
        # where it landed, from what it left behind
        if fresh(tmp):
            kinds["checkpoint write"] += 1
        elif fresh(old):
            kinds["checkpoint swap"] += 1
        else:
            kinds["mid-step" if new_steps() else "start-up"] += 1
        steps = new_steps()
        if steps:
            if len(steps) > 1:  # learn a step's time, so mid-step moments spread over a step
                step_s = max(0.005, (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"]) / (len(steps) - 1))
            # resume continued from the checkpoint: the first new step follows the checkpoint's step
            assert steps[0]["step"] == resumed_step + 1, (steps[0], resumed_step)
        # no half-written record, nothing reported saved is lost, and the last checkpoint loads
        text = (out / "metrics.jsonl").read_text() if (out / "metrics.jsonl").is_file() else ""
        assert not text or text.endswith("\n"), "the kill left a half-written metrics record"
        saved = max((r["step"] for r in records(out) if "checkpoint" in r), default=0)
        assert saved >= saved_before
        ckpt = find_checkpoint(out)
        if saved:
            assert ckpt is not None, f"step {saved} was reported saved but no complete checkpoint is left"
        if ckpt is not None:
            state = torch.load(ckpt / "trainer.pt", weights_only=False)
            assert state["step"] >= saved, f"checkpoint holds step {state['step']}, step {saved} was reported saved"
            LongMem.from_pretrained(ckpt)
        assert launches <= 3 * KILLS + 5, "the kill loop does not converge"

    # the interrupted run ends exactly where the uninterrupted one does
    assert [r["step"] for r in records(out) if "loss" in r][-1] == max_steps
    want, got = LongMem.from_pretrained(reference), LongMem.from_pretrained(out)
    for (k, v), (_, w) in zip(want.sidenet.state_dict().items(), got.sidenet.state_dict().items()):
        assert_close(w, v, rtol=1e-5, atol=1e-6, msg=k)
    survived = sum(kinds.values())
    assert survived >= min(KILLS, 3)
    report(capsys, f"train: survived {survived} SIGKILLs ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))}) "
                   f"over {launches} starts, {max_steps} steps; final weights equal the uninterrupted run's")


# -- longmem memory add ----------------------------------------------------------------------------

REPORTED = re.compile(r"memory 'm': (\d+) tokens stored \(\+(\d+) pending\) from (\d+) source")


def text_file(path: Path, index: int, words: int = 3000) -> Path:
    rng = random.Random(1000 + index)
    vocab = "alpha beta gamma delta river castle garden letter morning sister carriage window".split()
    path.write_text(" ".join(rng.choice(vocab) if i % 29 else f"Name{index}x{i}" for i in range(words)) + "\n")
    return path


def test_memory_add_survives_random_kills_and_keeps_old_or_new_content(tiny_checkpoint, tmp_path, capsys):
    from longmem.loading import load_tokenizer
    from longmem.store import ingest_file

    home = tmp_path / "home"
    env = {**ENV, "LONGMEM_HOME": str(home)}
    store = MemoryStore(home)
    model = LongMem.from_pretrained(tiny_checkpoint).eval()
    tok = load_tokenizer(str(tiny_checkpoint / "backbone"))
    size = 1 << 16  # FIFO large enough that every added file changes the stored tokens

    # the states an uninterrupted sequence of adds goes through: state i = files 0..i-1 added
    reference = model.new_memory(1, memory_size=size)
    states = [None]  # (tokens + pending, keys) after i files

    def state_after(i: int):
        while len(states) <= i:
            ingest_file(model, tok, reference, files[len(states) - 1])
            k, _ = reference.chronological(0)
            states.append((reference.num_tokens(0) + reference.num_pending(0), k.clone()))
        return states[i]

    files: list[Path] = []
    rng = random.Random(SEED)
    kinds = Counter()
    startup_s = 2.5  # seconds: less than a start-up takes here (imports, model), so these kills land in it
    launches, reported = 0, []
    while True:
        have = len(store.header("m")["rows"][0]["sources"]) if store.exists("m") else 0
        if len(files) <= have:
            files.append(text_file(tmp_path / f"part{len(files)}.txt", len(files)))
        target = files[have]
        proc = launch(["memory", "add", "m", target, "--model", tiny_checkpoint, "--memory-size", size, "--no-progress"], env)
        launches += 1
        pid = proc.pid
        tmp_file = store.dir / f"m.safetensors.tmp-{pid}"

        def reading():  # the ingest has read the file (the up-front check reads only its first 8 KiB)
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == str(target):
                        pos = int(Path(f"/proc/{pid}/fdinfo/{fd}").read_text().split()[1])
                        return pos > 8192
            except (OSError, ValueError, IndexError):
                pass
            return False

        # the second add, a quarter of the others and the one after the last kill finish: most kills hit an append
        kind = "finish" if sum(kinds.values()) >= KILLS or rng.random() < 0.25 or launches == 1 else \
            ["start-up", "mid-step", "checkpoint write"][rng.randrange(3)]
        if kind == "start-up":
            killed = kill_when(proc, lambda: True, then=rng.uniform(0, startup_s))
        elif kind == "mid-step":  # reading the file: tokenizing, the backbone, memory writes
            killed = kill_when(proc, reading, then=rng.uniform(0, 0.3), poll=0.002)
        elif kind == "checkpoint write":
            killed = kill_when(proc, tmp_file.exists)
        else:
            killed = False
        stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
        m = REPORTED.search(stdout)
        if m:
            reported.append(tuple(map(int, m.groups())))
        if not killed:
            assert proc.returncode == 0, stderr[-3000:]
            assert m and int(m.group(3)) == have + 1, stdout
            if sum(kinds.values()) >= KILLS:
                break
            continue
        kinds["checkpoint write" if tmp_file.exists() else kind] += 1
        # the memory loads and verifies, and holds the old content or the new, nothing in between
        if not store.exists("m"):
            assert have == 0 and not reported
            continue
        bank = store.load("m", model)
        n = len(bank.rows[0].sources)
        assert n in (have, have + 1), (n, have)
        tokens, keys = state_after(n)
        assert bank.num_tokens(0) + bank.num_pending(0) == tokens
        assert_close(bank.chronological(0)[0], keys, rtol=1e-5, atol=1e-6)
        if reported:  # what was reported saved is still there (or the add after it, finished but not yet reported)
            assert reported[-1][2] in (n, n - 1)
        assert launches <= 4 * KILLS + 5, "the kill loop does not converge"

    # the finished memory equals one built without interruptions, and no temporary file is left behind
    bank = store.load("m", model)
    n = len(bank.rows[0].sources)
    tokens, keys = state_after(n)
    assert reported[-1] == (bank.num_tokens(0), bank.num_pending(0), n)
    assert bank.num_tokens(0) + bank.num_pending(0) == tokens
    assert_close(bank.chronological(0)[0], keys, rtol=1e-5, atol=1e-6)
    assert [p.name for p in store.dir.iterdir() if ".tmp-" in p.name] == []
    survived = sum(kinds.values())
    assert survived >= min(KILLS, 3)
    report(capsys, f"memory add: survived {survived} SIGKILLs ({', '.join(f'{k} {c}' for k, c in sorted(kinds.items()))}) "
                   f"over {launches} starts, {n} files added; the memory equals an uninterrupted build")


def test_saving_removes_what_a_writer_killed_mid_save_left_behind(tmp_path):
    from longmem.memory import MemoryBank

    store = MemoryStore(tmp_path)
    store.dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now: a file named after it was left by a killed writer
    stale, live = store.dir / f"m.safetensors.tmp-{dead.pid}", store.dir / f"m.safetensors.tmp-{os.getppid()}"
    stale.write_bytes(b"half a memory")
    live.write_bytes(b"another writer, still running")
    store.save("m", MemoryBank(1, num_heads=1, head_dim=2, chunk_size=1, memory_size=4))
    assert not stale.exists() and live.exists() and store.exists("m")


def test_saved_files_are_readable_as_open_would_make_them(tiny_checkpoint, tmp_path):
    """safetensors creates its files 0600; the atomic write gives them the mode open() would (umask 022: 0644), so a
    model or a memory saved by one user can be read by another (a shared folder, a container's other user)."""
    from longmem.memory import MemoryBank

    old = os.umask(0o022)
    try:
        LongMem.from_pretrained(tiny_checkpoint).save_pretrained(tmp_path / "model")
        MemoryStore(tmp_path / "memories").save("m", MemoryBank(1, num_heads=1, head_dim=2, chunk_size=1, memory_size=4))
    finally:
        os.umask(old)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}
