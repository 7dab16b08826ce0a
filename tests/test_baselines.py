"""The paper's baselines (coupled memory, plain fine-tuning) train with the same command family."""

import json

import pytest
import torch

from longmem import LongMem, load_model
from longmem.baselines import CoupledMemoryLM, FinetunedLM
from longmem.staleness import staleness
from longmem.cli import main
from longmem.config import LongMemConfig
from longmem.io import verify_result
from longmem.stream_loss import stream_nll

from test_train import train_args


@pytest.mark.parametrize("method", ["memtrm", "finetune", "longmem"])
def test_each_method_trains_checkpoints_loads_and_evaluates(method, tiny_assets, tmp_path):
    out = tmp_path / method
    assert main(train_args(tiny_assets, out, "--method", method, "--max-steps", "3", "--eval-every", "0",
                           "--staleness-every", "1")) == 0
    model = load_model(out)
    assert model.method == method
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len([r for r in rows if "loss" in r]) == 3
    stale = [r["staleness"] for r in rows if "staleness" in r]
    if method == "longmem":  # the frozen backbone: stored keys are exactly what it computes now
        assert stale and all(abs(x["cos"] - 1) < 1e-4 for s in stale for x in s)
    doc = torch.randint(0, 200, (40,)).numpy()
    for mode in ("longmem", "no_memory", "backbone"):
        assert stream_nll(model, [doc], mode).tokens == 39


def test_memtrm_memory_goes_stale_while_longmem_stays_fresh(tiny_assets):
    """Train a coupled model a few steps after writing its memory: its stored keys drift; LongMem's do not."""
    cfg = LongMemConfig(chunk_size=2, memory_size=256, topk_chunks=4, segment_length=16)
    segs = [torch.randint(0, 200, (1, 16)) for _ in range(3)]
    for cls, should_drift in ((CoupledMemoryLM, True), (LongMem, False)):
        model = cls.from_backbone(tiny_assets["backbone"], cfg)
        mem = model.new_memory(1)
        opt = torch.optim.SGD(model.trainable_parameters(), lr=0.05)
        for s in segs:
            loss = model(s, memory=mem, labels=s).loss
            loss.backward()
            opt.step(), opt.zero_grad()
        cos = [x["cos"] for x in staleness(model, mem, segs)]
        assert len(cos) == 3
        if should_drift:
            assert max(cos) < 0.9999  # every entry was written by weights that have since changed
        else:
            assert all(abs(c - 1) < 1e-5 for c in cos)


def test_baseline_backbone_mode_is_the_untrained_backbone(tiny_assets):
    m = FinetunedLM.from_backbone(tiny_assets["backbone"], LongMemConfig(segment_length=16))
    ref = LongMem.from_backbone(tiny_assets["backbone"], LongMemConfig(segment_length=16))
    with torch.no_grad():
        for p in m.trainable_parameters():
            p.add_(0.1)
    ids = torch.randint(0, 200, (1, 16))
    assert torch.equal(m.backbone_logits(ids), ref.backbone_logits(ids))
    assert not torch.allclose(m(ids).logits, ref.backbone_logits(ids))


def test_staleness_report_compares_runs(tiny_assets, tmp_path, capsys):
    runs = []
    for method in ("memtrm", "longmem"):
        out = tmp_path / method
        assert main(train_args(tiny_assets, out, "--method", method, "--max-steps", "3", "--eval-every", "0",
                               "--staleness-every", "1", "--lr", "0.05")) == 0
        runs.append(str(out))
    png, js = tmp_path / "s.png", tmp_path / "s.json"
    assert main(["staleness", "--run", *runs, "--plot", str(png), "--json", str(js)]) == 0
    curves = verify_result(js)
    assert set(curves) == {"memtrm:memtrm", "longmem:longmem"}
    assert all(abs(c - 1) < 1e-4 for c in curves["longmem:longmem"].values())
    assert min(curves["memtrm:memtrm"].values()) < 0.9999
    assert png.stat().st_size > 1000
    assert main(["staleness", "--run", str(tmp_path / "nothing")]) == 2
