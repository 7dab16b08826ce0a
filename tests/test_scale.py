"""Scaling the SideNet's training: FSDP2 against DDP, resume, two nodes, gradient checkpointing, LoRA, bad flags.

The multi-process tests run the real CLI under torchrun on the CPU (gloo), 2 processes, fp32, on the
tiny Llama backbone (no dropout, so two runs from the same seed can agree to float rounding).
Tolerance for "the same weights": 1e-5 absolute after 10 steps (measured: ~3e-7; the SideNet's weights
move by ~1e-2 over the run). FSDP reduces gradients with reduce-scatter and clips a sharded norm,
DDP with all-reduce: the sums are ordered differently, so bitwise equality is not expected.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch.testing import assert_close

from longmem import LongMem, LongMemConfig
from longmem.cli import main
from longmem.training.scale import add_lora, lora_layers, merge_lora

from test_train import train_args

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
STEPS = ["--max-steps", "10", "--save-every", "2", "--eval-every", "0"]
TOL = dict(rtol=0, atol=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args, nproc=2, nnodes=1, node_rank=0, port=None):
    """The command line of `longmem` under torchrun (one node, or node ``node_rank`` of ``nnodes`` on 127.0.0.1)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    if nnodes > 1:
        launch += ["--nnodes", str(nnodes), "--node-rank", str(node_rank), "--master-addr", "127.0.0.1",
                   "--master-port", str(port)]
    else:
        launch += ["--master-port", str(free_port())]
    return launch + ["-m", "longmem.cli", *map(str, args)]


def run(cmd):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def sidenet_diff(a, b) -> float:
    sa, sb = LongMem.from_pretrained(a).sidenet.state_dict(), LongMem.from_pretrained(b).sidenet.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.fixture(scope="module")
def ddp_and_fsdp(tiny_assets, tmp_path_factory):
    """The same 10 steps under DDP and under FSDP (2 processes each), uninterrupted."""
    root = tmp_path_factory.mktemp("scale")
    outs = {s: root / s for s in ("ddp", "fsdp")}
    for strategy, out in outs.items():
        run(torchrun(train_args(tiny_assets, out, *STEPS, "--strategy", strategy)))
    return outs


def test_fsdp_and_ddp_train_the_same_sidenet_and_the_fsdp_checkpoint_loads_in_one_process(ddp_and_fsdp, tiny_assets):
    ddp, fsdp = ddp_and_fsdp["ddp"], ddp_and_fsdp["fsdp"]
    loss = lambda out: [json.loads(x)["loss"] for x in open(out / "metrics.jsonl") if '"loss"' in x]  # noqa: E731
    assert_close(torch.tensor(loss(fsdp)), torch.tensor(loss(ddp)), **TOL)
    assert sidenet_diff(ddp, fsdp) < 1e-5
    start = LongMem.from_backbone(tiny_assets["backbone"], LongMem.from_pretrained(ddp).config)
    moved = max((v - start.sidenet.state_dict()[k]).abs().max().item() for k, v in LongMem.from_pretrained(ddp).sidenet.state_dict().items())
    assert moved > 1e-3  # the runs did train
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = LongMem.from_pretrained(ddp).eval(), LongMem.from_pretrained(fsdp).eval()  # one process, no FSDP
        assert_close(b(ids).logits, a(ids).logits, **TOL)
        LongMem.from_pretrained(fsdp / "checkpoint")  # the checkpoint too


def test_fsdp_killed_then_resumed_equals_the_uninterrupted_run(ddp_and_fsdp, tiny_assets, tmp_path):
    """SIGKILL the whole FSDP job after a checkpoint, resume (sharded backbone, gradient checkpointing: neither
    changes the arithmetic), finish: the same SideNet as the uninterrupted FSDP run."""
    out = tmp_path / "killed"
    cmd = torchrun(train_args(tiny_assets, out, *STEPS, "--strategy", "fsdp", "--shard-backbone", "--grad-checkpointing"))
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoint" / "COMPLETE").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and both workers, mid-run
    job.wait()
    killed_at = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)["step"]
    assert 2 <= killed_at < 10
    run(cmd + ["--resume"])
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert steps[-1] == 10 and set(range(1, 11)) <= set(steps)
    assert sidenet_diff(out, ddp_and_fsdp["fsdp"]) < 1e-5


def test_two_nodes_on_loopback_train_checkpoint_and_resume(ddp_and_fsdp, tiny_assets, tmp_path):
    """Two torchrun launchers of one process each (--nnodes 2, node ranks 0 and 1, master 127.0.0.1): the job
    stops after its first step with a checkpoint (--max-minutes 0), resumes, and ends where one node with two
    processes ends."""
    out = tmp_path / "nodes"

    def both(*extra):
        port = free_port()
        args = train_args(tiny_assets, out, *STEPS, "--strategy", "fsdp", *extra)
        jobs = [subprocess.Popen(torchrun(args, nproc=1, nnodes=2, node_rank=k, port=port), env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for k in (0, 1)]
        for j in jobs:
            _, err = j.communicate(timeout=300)
            assert j.returncode == 0, err[-3000:]

    both("--max-minutes", "0")
    assert torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)["step"] == 1
    both("--resume")
    steps = [json.loads(x)["step"] for x in open(out / "metrics.jsonl") if '"loss"' in x]
    assert steps == list(range(1, 11))
    assert sidenet_diff(out, ddp_and_fsdp["fsdp"]) < 1e-5


def test_resuming_with_another_process_count_is_one_line(ddp_and_fsdp, tiny_assets, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(ddp_and_fsdp["fsdp"], out)
    assert main(train_args(tiny_assets, out, "--max-steps", "12", "--resume")) == 2
    err = capsys.readouterr().err.strip()
    assert "written by 2 process(es), this run has 1" in err and "--init-from" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("flags, needle", [
    (["--lora-rank", "0"], "--lora-rank must be a positive rank"),
    (["--strategy", "fsdp"], "--strategy fsdp shards across processes but this is one"),
    (["--strategy", "zero3"], "--strategy must be one of ddp, fsdp"),
    (["--shard-backbone"], "--shard-backbone shards with FSDP"),
    (["--method", "memtrm", "--lora-rank", "4"], "--lora-rank scales the LongMem SideNet"),
    (["--dtype", "fp8"], "--dtype must be fp32 or bf16"),
])
def test_bad_combinations_are_one_line(flags, needle, tiny_assets, tmp_path, capsys):
    assert main(train_args(tiny_assets, tmp_path / "o", "--max-steps", "1", *flags)) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o" / "sidenet.safetensors").exists()


def _memory_with(model, ids):
    memory = model.new_memory(ids.shape[0])
    model.write_memory(ids, memory)
    return memory


def test_gradient_checkpointing_gives_the_plain_gradients(backbone_hf):
    """Every SideNet block recomputed in the backward pass but the memory layer (its memory has changed by
    then): the same gradients, with dropout on (GPT-2) and retrieval from a filled memory."""
    cfg = LongMemConfig(chunk_size=2, memory_size=64, topk_chunks=4, segment_length=16)
    model = LongMem.from_backbone(backbone_hf, cfg).train()
    past, ids = torch.randint(0, 90, (2, 48)), torch.randint(0, 90, (2, 16))
    grads = []
    for recompute in (False, True):
        model.sidenet.grad_checkpointing = recompute
        model.zero_grad(set_to_none=True)
        memory = _memory_with(model, past)
        torch.manual_seed(0)
        model(ids, memory=memory, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.sidenet.named_parameters()})
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[0].values())
    for n in grads[0]:
        assert_close(grads[1][n], grads[0][n], rtol=0, atol=1e-7, msg=n)


def test_lora_merge_gives_the_adapted_logits(backbone_hf):
    """GPT-2's Conv1D (weights stored (in, out)) and Llama's Linear: W + scale * B A, by name, as peft's merge."""
    model = LongMem.from_backbone(backbone_hf, LongMemConfig(segment_length=16)).eval()
    add_lora(model.sidenet, rank=2, alpha=4.0)
    with torch.no_grad():
        for name, p in model.sidenet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at 0: make the adapters do something
    ids = torch.randint(0, 90, (2, 16))
    adapted = model(ids).logits
    merged = LongMem.from_backbone(backbone_hf, LongMemConfig(segment_length=16)).eval()
    merged.sidenet.load_state_dict(merge_lora(model.sidenet.state_dict(), lora_layers(model.sidenet)))
    assert_close(merged(ids).logits, adapted, rtol=0, atol=1e-5)


def test_lora_trains_only_adapters_gate_and_norms_and_loads_with_from_pretrained(tiny_assets, tmp_path):
    weights = tiny_assets["backbone"] / "model.safetensors"
    before = hashlib.sha256(weights.read_bytes()).hexdigest()
    out = tmp_path / "lora"
    assert main(train_args(tiny_assets, out, "--lora-rank", "4", "--max-steps", "3", "--save-every", "3", "--eval-every", "0")) == 0
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == before  # the frozen backbone is bit-identical
    trained = torch.load(out / "checkpoint" / "trainer.pt", weights_only=False)["lora_sidenet"]  # unmerged
    start = LongMem.from_backbone(tiny_assets["backbone"], LongMem.from_pretrained(out).config)
    init = start.sidenet.state_dict()
    changed = {k for k, v in trained.items() if k.replace(".base_layer", "") in init and not torch.equal(v, init[k.replace(".base_layer", "")])}
    assert changed and all("norm" in k or k == "gate" for k in changed)  # linear weights and biases untouched
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "lora_B" in k)  # the adapters trained
    # from_pretrained (no peft step) == the adapted model
    loaded = LongMem.from_pretrained(out).eval()
    add_lora(start.sidenet, rank=4, alpha=8.0)
    start.sidenet.load_state_dict(trained)
    ids = torch.randint(0, 200, (2, 16))
    with torch.no_grad():
        assert_close(loaded(ids).logits, start.eval()(ids).logits, rtol=0, atol=1e-5)
    # and the run resumes (adapters and their optimizer state from the checkpoint)
    assert main(train_args(tiny_assets, out, "--lora-rank", "4", "--max-steps", "4", "--eval-every", "0", "--resume")) == 0
    assert main(train_args(tiny_assets, out, "--lora-rank", "8", "--max-steps", "5", "--resume")) == 2


def test_bf16_backbone_trains_an_fp32_sidenet_and_loads_as_trained(tiny_assets, tmp_path):
    out = tmp_path / "bf16"
    assert main(train_args(tiny_assets, out, "--dtype", "bf16", "--precision", "bf16", "--max-steps", "2", "--eval-every", "0")) == 0
    model = LongMem.from_pretrained(out).eval()  # the recorded dtype: no flag needed
    assert model.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in model.sidenet.parameters())
    ids = torch.randint(0, 200, (1, 16))
    memory = model.new_memory(1)
    with torch.no_grad():
        logits = model(ids, memory=memory).logits  # runs without autocast too
    assert torch.isfinite(logits).all()
    assert main(train_args(tiny_assets, tmp_path / "x", "--dtype", "bf16", "--precision", "fp32")) == 2
