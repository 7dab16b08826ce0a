"""scripts/gpu_default.py end to end on the CPU at a tiny size (--smoke): the path a lent GPU will run, checked here
first because its time is short. Opt-in (`pytest -m slow`): a few minutes on 2 cores.

What must hold: it pretrains, adapts, evaluates and packs everything into OUT as at most 8 files under the device's
16 MiB limit, and the parts put back together give a model folder that loads and runs.
"""

import json
import lzma
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import code_document
from longmem import LongMem

ROOT = Path(__file__).resolve().parent.parent
PROSE = ("It was a truth universally acknowledged that the weather at the house had been fine for a week, and Miss "
         "Taylor walked out with her sister every morning to see the garden and the orchard below the hill. ")


def write_src(src: Path) -> None:
    """The six xz corpora the script expects, tiny: prose for books, code for code."""
    src.mkdir()
    for corpus, make in (("books", lambda i: PROSE * 120 + f"Chapter {i}\n"), ("code", lambda i: code_document(300))):
        for split in ("train", "validation", "test"):
            with lzma.open(src / f"{corpus}-{split}.jsonl.xz", "wt") as f:
                for i in range(2):
                    f.write(json.dumps({"id": f"{corpus}{i}", "text": make(i)}) + "\n")


@pytest.mark.slow
def test_smoke_run_packs_a_model_that_loads(tmp_path):
    write_src(tmp_path / "src")
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_default.py"), "--src", str(tmp_path / "src"),
                          "--work", str(tmp_path / "work"), "--out", str(out), "--smoke", "--budget-s", "1500"],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all((out / f).stat().st_size < 16 * 2**20 for f in files)
    summary = json.loads((out / "summary.json").read_text())
    assert {"pretrain", "copy_in_context", "adapt", "eval", "bf16_reload_max_logit_diff"} <= set(summary)
    assert summary["bf16_reload_max_logit_diff"] < 0.1
    for name in ("passkey", "ppl_code_test", "ppl_books_test", "memory_copy"):
        assert summary["eval"][name]["exit"] == 0, name
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for stem in ("backbone", "sidenet"):  # the parts as the device returns them, put back together
        whole = tmp_path / f"{stem}.tar"
        whole.write_bytes(b"".join((out / f).read_bytes() for f in files if f.startswith(f"{stem}.tar.part")))
        with tarfile.open(whole) as t:
            t.extractall(model_dir, filter="data")
    model = LongMem.from_pretrained(model_dir).eval()
    logits = model(torch.tensor([[5, 6, 7, 8] * 16])).logits
    assert torch.isfinite(logits).all()
