"""`longmem adapt` end to end on a tiny backbone: it trains only the memory block, its scale and the gate, saves
the step reached, resumes from it, and exports a folder that loads."""

import json

import torch
from safetensors.torch import load_file

from longmem import LongMem
from longmem.cli import main
from longmem.training.adapt import export


def test_adapt_trains_the_memory_block_resumes_and_exports(tiny_assets, tmp_path, capsys):
    out = tmp_path / "adapt"
    args = ["adapt", "--backbone", str(tiny_assets["backbone"]), "--out", str(out), "--no-books", "--no-progress",
            "--chat-fraction", "0", "--memory-max", "2048", "--local-max", "32", "--accumulate", "1", "--eval-every", "2"]
    assert main(args + ["--max-steps", "2", "--device", "cpu"]) == 0
    first = json.loads((out / "state.json").read_text())
    assert first["step"] == 2 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 2
    trained = load_file(str(out / "trained.safetensors"))
    fresh = LongMem.from_backbone(tiny_assets["backbone"])
    j = fresh.sidenet.memory_index
    expected = {n for n, _ in fresh.sidenet.named_parameters() if n.startswith(f"blocks.{j}.") or n == "gate"}
    assert set(trained) == expected | {f"scales.{j}"} and len(expected) > 2
    assert float(trained[f"scales.{j}"]) != 0.0  # the memory block came in
    assert main(args + ["--max-steps", "3", "--precision", "bf16", "--export", str(tmp_path / "cli-model")]) == 0  # resumed
    assert (out / "curves.png").stat().st_size > 0
    assert json.loads((tmp_path / "cli-model" / "adaptation.json").read_text())["step"] == 3
    state = json.loads((out / "state.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert state["step"] == 3 and [r["step"] for r in rows] == [1, 2, 3]
    assert len(state["phases"]) == 2 and state["phases"][1]["from_step"] == 2
    folder = export(out, tmp_path / "model", backbone=tiny_assets["backbone"])
    model = LongMem.from_pretrained(folder).eval()
    with torch.no_grad():
        assert model.sidenet.skipped_blocks() == set(range(model.sidenet.num_layers)) - {j}
    torch.testing.assert_close(model.sidenet.gate.data, load_file(str(out / "trained.safetensors"))["gate"].bfloat16().float())


def test_sigterm_stops_a_background_adaptation_through_its_save(tiny_assets, tmp_path):
    """A run started in the background (SIGINT ignored, as a shell's `&` leaves it) and stopped with `kill` keeps
    every step it finished."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "adapt"
    cmd = [sys.executable, "-m", "longmem.cli", "adapt", "--backbone", str(tiny_assets["backbone"]), "--out", str(out),
           "--no-books", "--no-progress", "--chat-fraction", "0", "--memory-max", "2048", "--local-max", "32",
           "--accumulate", "1", "--eval-every", "1000", "--save-minutes", "60", "--max-minutes", "5"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 300  # a busy machine starts Python slowly

    def logged_two():
        return metrics.is_file() and metrics.read_text().count("\n") >= 2

    while time.monotonic() < deadline and proc.poll() is None and not logged_two():
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    assert logged_two(), "the run logged fewer than 2 steps in 300 s"
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    logged = len(metrics.read_text().splitlines())
    assert json.loads((out / "state.json").read_text())["step"] == logged >= 2


def test_adapt_blocks_upper_trains_the_memory_block_and_those_above(tiny_assets, tmp_path):
    """--blocks upper, resumed from a run that trained block j alone: it now trains blocks j..top, their scales and
    the gate (fresh optimizer moments), and the exported model skips only the blocks below j."""
    from conftest import VOCAB, make_llama

    backbone = tmp_path / "backbone"  # deep enough to have blocks above the memory block
    hf = make_llama(layers=8)
    hf.resize_token_embeddings(len(tiny_assets["tokenizer"])) if len(tiny_assets["tokenizer"]) > VOCAB else None
    hf.save_pretrained(backbone)
    tiny_assets["tokenizer"].save_pretrained(backbone)
    out = tmp_path / "adapt"
    args = ["adapt", "--backbone", str(backbone), "--out", str(out), "--no-books", "--no-progress",
            "--chat-fraction", "0", "--memory-max", "2048", "--local-max", "32", "--accumulate", "1", "--eval-every", "100"]
    assert main(args + ["--max-steps", "1"]) == 0
    before = load_file(str(out / "trained.safetensors"))
    assert main(args + ["--max-steps", "2", "--blocks", "upper", "--export", str(tmp_path / "model")]) == 0
    model = LongMem.from_pretrained(tmp_path / "model").eval()
    j, top = model.sidenet.memory_index, model.sidenet.num_layers
    assert j < top - 1  # there are blocks above j to train
    trained = load_file(str(out / "trained.safetensors"))
    assert {n.split(".")[1] for n in trained if n != "gate"} == {str(i) for i in range(j, top)}
    assert set(before) < set(trained)
    assert all(float(trained[f"scales.{i}"]) != 0.0 for i in range(j, top))  # each block above j came in
    assert json.loads((out / "state.json").read_text())["config"]["blocks"] == "upper"
    with torch.no_grad():
        assert model.sidenet.skipped_blocks() == set(range(j))


def test_adapt_paper_start_trains_the_whole_sidenet(tiny_assets, tmp_path):
    """--sidenet-init paper --blocks all, the paper's start and training (for comparison with the identity start):
    every SideNet tensor trains, there are no residual scales, and the export loads as that model."""
    out = tmp_path / "adapt"
    args = ["adapt", "--backbone", str(tiny_assets["backbone"]), "--out", str(out), "--no-books", "--no-progress",
            "--chat-fraction", "0", "--memory-max", "2048", "--local-max", "32", "--accumulate", "1", "--eval-every", "2",
            "--sidenet-init", "paper", "--blocks", "all", "--max-steps", "2", "--export", str(tmp_path / "model")]
    fresh = LongMem.from_backbone(tiny_assets["backbone"])  # the paper's start is LongMemConfig's default
    assert main(args) == 0
    trained = load_file(str(out / "trained.safetensors"))
    assert set(trained) == {n for n, _ in fresh.sidenet.named_parameters()}
    moved = [n for n, p in fresh.sidenet.named_parameters() if not torch.equal(p.detach(), trained[n])]
    assert len(moved) > len(trained) // 2  # trained, not just saved
    assert [json.loads(line)["alpha"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1.0, 1.0]
    model = LongMem.from_pretrained(tmp_path / "model")
    assert model.config.sidenet_init == "paper" and model.sidenet.scales is None
