"""scripts/package_default.py: a trained run becomes the shipped longmem-tiny's folder, exactly, or nothing changes."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import make_llama
from longmem import LongMem

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "package_default.py"


def package(run, into):
    return subprocess.run([sys.executable, str(SCRIPT), str(run), "--into", str(into)], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}, timeout=300)


def test_a_run_becomes_the_default_with_its_config_and_weights(tiny_checkpoint, tmp_path):
    into = tmp_path / "default"
    shutil.copytree(tiny_checkpoint, into)
    run = tmp_path / "runs" / "copy-trained"
    model = LongMem.from_pretrained(into, retrieval_query="key", retrieval_metric="cosine", retrieval_next=True)
    with torch.no_grad():
        for p in model.sidenet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(run)  # the backbone by absolute path, as `longmem train` writes it
    (run / "train_config.json").write_text('{"lr": 0.001}\n')
    r = package(run, into)
    assert r.returncode == 0, r.stderr
    meta = json.loads((into / "longmem.json").read_text())
    assert meta["backbone"]["path"] == "backbone"
    assert meta["config"]["retrieval_next"] is True and meta["config"]["retrieval_query"] == "key"
    assert json.loads((into / "history" / "copy-trained" / "train_config.json").read_text()) == {"lr": 0.001}
    moved = tmp_path / "moved"  # relocatable: the folder alone, elsewhere
    shutil.move(str(into), moved)
    got = LongMem.from_pretrained(moved)
    for (k, a), (_, b) in zip(sorted(got.sidenet.state_dict().items()), sorted(model.sidenet.state_dict().items())):
        assert torch.equal(a, b), k


def test_a_run_on_another_backbone_is_refused_and_nothing_changes(tiny_checkpoint, tmp_path):
    into = tmp_path / "default"
    shutil.copytree(tiny_checkpoint, into)
    before = {p.name: p.read_bytes() for p in into.iterdir() if p.is_file()}
    other = tmp_path / "other-backbone"
    make_llama(seed=7).save_pretrained(other)
    LongMem.from_backbone(other, LongMem.from_pretrained(into).config).save_pretrained(tmp_path / "run")
    r = package(tmp_path / "run", into)
    assert r.returncode != 0 and "another backbone" in r.stderr
    assert {p.name: p.read_bytes() for p in into.iterdir() if p.is_file()} == before
    assert not (into / "history").exists()
