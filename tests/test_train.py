"""Adaptation end to end through the real CLI, exact resume, distributed run, evaluation modes."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from longmem import LongMem
from longmem.cli import main
from longmem.loading import load_model
from longmem.training.config import TrainConfig
from longmem.training.step import rng_state, set_rng_state

TINY = ["--batch-size", "2", "--segment-length", "16", "--memory-size", "128", "--chunk-size", "2",
        "--topk-chunks", "4", "--lr", "3e-3", "--precision", "fp32", "--no-progress", "--eval-docs", "2",
        "--eval-segments", "3"]


def train_args(a, out, *extra):
    return ["train", "--backbone", str(a["backbone"]), "--data", str(a["train"]), "--val-data", str(a["val"]),
            "--out", str(out), *TINY, *extra]


def test_train_cli_end_to_end(tiny_assets, tmp_path):
    a = tiny_assets
    before = {k: v.clone() for k, v in LongMem.from_backbone(a["backbone"]).backbone.state_dict().items()}
    out = tmp_path / "run"
    assert main(train_args(a, out, "--max-steps", "6", "--eval-every", "3")) == 0
    model = LongMem.from_pretrained(out)
    for k, v in model.backbone.state_dict().items():  # the backbone on disk was not touched
        assert torch.equal(v, before[k])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 7))
    assert any("val_loss_longmem" in r and "val_loss_no_memory" in r for r in rows)
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoint" / "trainer.pt").is_file()
    assert model.config.memory_size == 128 and model.segment_length == 16
    written = json.loads((out / "train_config.json").read_text())  # flat: one key per flag; it loads back
    assert set(written) == TrainConfig.keys() and written["memory_size"] == 128 and written["batch_size"] == 2
    assert json.loads(json.dumps(TrainConfig.from_dict(written).to_dict())) == written
    # running again into the same folder without --resume is refused, nothing overwritten
    stamp = (out / "sidenet.safetensors").stat().st_mtime_ns
    assert main(train_args(a, out, "--max-steps", "6")) == 2
    assert (out / "sidenet.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("method", ["longmem", "memtrm", "finetune"])
def test_resume_is_exact(tiny_assets, tmp_path, method):
    a = tiny_assets
    full, split = tmp_path / "full", tmp_path / "split"
    run = ("--max-steps", "8", "--eval-every", "0", "--save-every", "4", "--method", method)
    assert main(train_args(a, full, *run)) == 0
    assert main(train_args(a, split, *run, "--max-minutes", "0")) == 0
    # the run above stopped after its first step (max-minutes 0) with a checkpoint; resume to the end
    assert main(train_args(a, split, *run, "--resume")) == 0
    loss = lambda out: [json.loads(line)["loss"] for line in open(out / "metrics.jsonl") if '"loss"' in line]  # noqa: E731
    assert_close(torch.tensor(loss(split)), torch.tensor(loss(full)), rtol=1e-5, atol=1e-6)
    ma, mb = load_model(full), load_model(split)
    for (k, v), (_, w) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert_close(v, w, rtol=1e-5, atol=1e-6)


def test_a_resumed_run_logs_each_step_once(tiny_assets, tmp_path):
    a = tiny_assets
    out = tmp_path / "run"
    assert main(train_args(a, out, "--max-steps", "4", "--eval-every", "0", "--save-every", "4")) == 0
    with open(out / "metrics.jsonl", "a") as f:  # a run killed after its checkpoint at step 4 had logged 5 and 6
        f.write(json.dumps({"step": 5, "loss": 9.0}) + "\n" + json.dumps({"step": 6, "loss": 9.0}) + "\n")
    assert main(train_args(a, out, "--max-steps", "6", "--eval-every", "0", "--save-every", "4", "--resume")) == 0
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"loss"' in line]
    assert steps == list(range(1, 7))


def test_checkpoint_files_and_folders_reach_the_disk(tiny_assets, tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1])
    out = tmp_path / "run"
    assert main(train_args(tiny_assets, out, "--max-steps", "2", "--eval-every", "0", "--save-every", "1")) == 0
    assert str(out) in synced  # the folder, after the checkpoint's swap and after the final weights' renames
    for name in ("trainer.pt", "sidenet.safetensors", "longmem.json"):
        assert any(p.startswith(str(out / "checkpoint.tmp")) and p.endswith(name) for p in synced), name
    assert str(out / "checkpoint.tmp") in synced


def test_two_process_torchrun_on_cpu_is_killed_resumes_and_keeps_learning(tiny_assets, tmp_path):
    """2-process DDP (gloo): SIGKILL the whole job after a checkpoint, resume, finish; backbone untouched."""
    import hashlib
    import signal
    import time

    a = tiny_assets
    weights = a["backbone"] / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "longmem.cli", *train_args(a, out, "--eval-every", "0", "--save-every", "2", "--max-steps", "40")]
    job = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoint" / "COMPLETE").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and both workers, mid-run
    job.wait()
    killed_at = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)["step"]
    assert 2 <= killed_at < 40
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    steps = [r["step"] for r in records]
    assert steps[-1] == 40 and set(range(1, 41)) <= set(steps)  # every step ran (some twice: after the kill)
    losses = {r["step"]: r["loss"] for r in records}
    assert sum(losses[s] for s in range(35, 41)) < sum(losses[s] for s in range(1, 7))  # it learns across the kill
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before  # the frozen backbone is bit-identical
    LongMem.from_pretrained(out)


def test_bad_training_inputs_are_one_line_errors(tiny_assets, tmp_path, capsys):
    a = tiny_assets
    empty = tmp_path / "empty"
    empty.mkdir()
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("alpha beta")
    for data, needle in ((empty, "no text"), (binary, "binary"), (tiny, "less than one segment"),
                         (tmp_path / "missing", "does not exist")):
        args = ["train", "--backbone", str(a["backbone"]), "--data", str(data), "--out", str(tmp_path / "o"), *TINY]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert needle in err and "\n" not in err and "Traceback" not in err
    assert main(["train", "--backbone", "no-org/no-model", "--data", str(a["train"]), "--out", str(tmp_path / "o2"), *TINY]) == 2
    assert "cannot load backbone" in capsys.readouterr().err
    assert not (tmp_path / "o" / "sidenet.safetensors").exists()


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_assets, tmp_path, monkeypatch, capsys):
    import longmem.training.step as st

    real, calls = st.next_token_loss, {"n": 0}

    def poisoned(logits, targets, **kw):
        calls["n"] += 1
        loss = real(logits, targets, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(st, "next_token_loss", poisoned)
    out = tmp_path / "nan"
    assert main(train_args(tiny_assets, out, "--max-steps", "6", "--eval-every", "0", "--save-every", "1")) == 2
    err = capsys.readouterr().err
    assert "loss became nan at step 2" in err and "Traceback" not in err
    state = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)
    assert state["step"] == 2  # the last good step's checkpoint, intact
    LongMem.from_pretrained(out / "checkpoint")


def _nan_on_rank_1(rank: int, assets: dict, out: str, port: int) -> None:
    """One process of a 2-process gloo job; rank 1's loss turns nan at its third step, rank 0's never does.
    Writes the CLI's exit status to OUT/exit-RANK."""
    import longmem.training.step as st

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    if rank == 1:
        real, calls = st.next_token_loss, {"n": 0}

        def poisoned(logits, targets, **kw):
            calls["n"] += 1
            loss = real(logits, targets, **kw)
            return loss * float("nan") if calls["n"] == 3 else loss

        st.next_token_loss = poisoned
    code = main(train_args(assets, out, "--max-steps", "6", "--eval-every", "0", "--save-every", "1"))
    Path(out + f"-exit-{rank}").write_text(str(code))


def test_a_nan_loss_on_one_process_stops_every_process(tiny_assets, tmp_path):
    """Only rank 1 sees the nan: both processes stop at the same step with the one-line error (without the
    reduction rank 0 would go on into the next step's gradient all-reduce and wait there for ever)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assets = {k: tiny_assets[k] for k in ("backbone", "train", "val")}
    out = str(tmp_path / "nan")
    job = torch.multiprocessing.start_processes(_nan_on_rank_1, args=(assets, out, port), nprocs=2, join=False,
                                                start_method="spawn")
    deadline = time.time() + 240
    try:
        while not job.join(timeout=1):
            assert time.time() < deadline, "a process did not stop"
    finally:
        for p in job.processes:
            if p.is_alive():
                p.kill()
    assert [Path(out + f"-exit-{r}").read_text() for r in (0, 1)] == ["2", "2"]
    assert torch.load(Path(out) / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 2


def test_rng_state_round_trip_on_cpu():
    dropout = torch.nn.Dropout(0.5)
    saved = rng_state(torch.device("cpu"))
    assert set(saved) == {"cpu"}
    first = (torch.rand(8), torch.randn(8), dropout(torch.ones(8)), torch.randint(0, 100, (8,)))
    set_rng_state(saved, torch.device("cpu"))
    second = (torch.rand(8), torch.randn(8), dropout(torch.ones(8)), torch.randint(0, 100, (8,)))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    set_rng_state(saved["cpu"], torch.device("cpu"))  # a checkpoint before the dict: the CPU state alone
    assert torch.equal(torch.rand(8), first[0])


def test_rng_state_keeps_the_accelerators_of_its_device(monkeypatch):
    """The accelerator's branch, run on the CPU with a stand-in device module (no GPU here)."""

    class FakeAccelerator:
        state = torch.tensor([1, 2, 3], dtype=torch.uint8)
        restored = []

        def get_rng_state(self, device):
            return self.state.clone()

        def set_rng_state(self, state, device):
            self.restored.append((state, device))

    fake = FakeAccelerator()
    monkeypatch.setattr(torch, "get_device_module", lambda device: fake)
    gpu = torch.device("cuda", 1)
    saved = rng_state(gpu)
    assert set(saved) == {"cpu", "cuda"} and torch.equal(saved["cuda"], fake.state)
    drawn = torch.rand(4)
    set_rng_state(saved, gpu)
    assert torch.equal(torch.rand(4), drawn)
    assert len(fake.restored) == 1 and torch.equal(fake.restored[0][0], fake.state) and fake.restored[0][1] == gpu
    set_rng_state(saved, torch.device("cpu"))  # a GPU run resumed on the CPU: the CPU state, the GPU's left out
    assert len(fake.restored) == 1 and torch.equal(torch.rand(4), drawn)


def test_init_from_starts_from_a_saved_sidenet_and_keeps_its_settings(tiny_assets, tmp_path):
    a = tiny_assets
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(train_args(a, first, "--max-steps", "3", "--eval-every", "0")) == 0
    start = LongMem.from_pretrained(first)
    # --init-from loads the SideNet (step 0 == the saved weights) and its memory settings, not the backbone's blocks
    assert main(["train", "--backbone", str(a["backbone"]), "--data", str(a["train"]), "--out", str(second),
                 "--init-from", str(first), "--max-steps", "1", "--lr", "1e-12", "--warmup-steps", "0",
                 "--batch-size", "2", "--precision", "fp32", "--no-progress", "--eval-every", "0"]) == 0
    after = LongMem.from_pretrained(second)
    assert after.config.memory_size == 128 and after.segment_length == 16
    for (k, v), (_, w) in zip(start.sidenet.state_dict().items(), after.sidenet.state_dict().items()):
        assert_close(v, w, rtol=1e-6, atol=1e-6, msg=k)
    fresh = LongMem.from_backbone(a["backbone"], start.config)
    assert any(not torch.equal(v, w) for v, w in zip(fresh.sidenet.state_dict().values(), after.sidenet.state_dict().values()))
    assert main(train_args(a, tmp_path / "x", "--init-from", str(first), "--method", "memtrm")) == 2
    # retrieval options given with --init-from override the saved ones (how longmem-tiny was continued)
    third = tmp_path / "third"
    assert main(["train", "--backbone", str(a["backbone"]), "--data", str(a["train"]), "--out", str(third),
                 "--init-from", str(first), "--max-steps", "1", "--batch-size", "2", "--precision", "fp32",
                 "--no-progress", "--eval-every", "0", "--retrieval-query", "key", "--retrieval-next"]) == 0
    cfg = LongMem.from_pretrained(third).config
    assert (cfg.retrieval_query, cfg.retrieval_next, cfg.memory_size) == ("key", True, 128)
    # ... and can turn an inherited option off again (back to the paper's retrieval from longmem-tiny)
    fourth = tmp_path / "fourth"
    assert main(["train", "--backbone", str(a["backbone"]), "--data", str(a["train"]), "--out", str(fourth),
                 "--init-from", str(third), "--max-steps", "1", "--batch-size", "2", "--precision", "fp32",
                 "--no-progress", "--eval-every", "0", "--retrieval-query", "query", "--no-retrieval-next"]) == 0
    cfg = LongMem.from_pretrained(fourth).config
    assert (cfg.retrieval_query, cfg.retrieval_next) == ("query", False)
    assert main(train_args(a, tmp_path / "y", "--retrieval-next", "--method", "memtrm")) == 2


def test_a_damaged_trainer_state_is_detected_on_resume(tiny_assets, tmp_path, capsys):
    a = tiny_assets
    out = tmp_path / "run"
    assert main(train_args(a, out, "--max-steps", "2", "--eval-every", "0", "--save-every", "2")) == 0
    state = out / "checkpoint" / "trainer.pt"
    assert json.loads((out / "checkpoint" / "COMPLETE").read_text())["trainer_sha256"]
    raw = bytearray(state.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    state.write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(train_args(a, out, "--max-steps", "4", "--eval-every", "0", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "trainer.pt is damaged (checksum mismatch)" in err and len(err.splitlines()) == 1
    assert state.read_bytes() == bytes(raw)  # left as it was


def test_adamw_is_fused_on_cpu_and_updates_as_the_unfused_one():
    from longmem.training.step import adamw

    torch.manual_seed(0)
    weights = [torch.randn(6, 5), torch.randn(5)]  # a matrix (decayed) and a vector (not decayed)
    grads = [[torch.randn_like(w) for w in weights] for _ in range(3)]

    def run(fused: bool):
        params = [torch.nn.Parameter(w.clone()) for w in weights]
        opt = adamw(params, lr=1e-2)
        assert all(g["fused"] for g in opt.param_groups)  # what `longmem train`, `adapt` and `pretrain` get on CPU
        if not fused:
            opt = torch.optim.AdamW(opt.param_groups, foreach=False)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return params

    fused, plain = run(True), run(False)
    assert not torch.equal(fused[0], weights[0])
    for a, b in zip(fused, plain):
        assert_close(a, b, rtol=1e-6, atol=1e-7)
