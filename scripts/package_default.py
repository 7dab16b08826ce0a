"""Make a trained run the shipped longmem-tiny: its SideNet into models/longmem-tiny, next to the backbone there.

The run must have been trained on that folder's backbone (the fingerprint is checked). Written: the run's
``sidenet.safetensors`` and ``longmem.json`` (its config: retrieval options included; the backbone by the relative
path ``backbone`` so the folder moves with the repository), and the run's ``train_config.json``, ``loss.png`` and
``metrics.jsonl`` under ``history/<run name>/``. Then the folder is loaded back and must give the run's logits
exactly, with and without memory.

    .venv/bin/python scripts/package_default.py runs/memcopy-books2 [--into models/longmem-tiny]
"""
import argparse
import json
import shutil
from pathlib import Path

import torch

from longmem import LongMem
from longmem.model import WEIGHTS_FILE
from longmem.io import read_checkpoint_meta, write_checkpoint_meta


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a `longmem train` OUT folder")
    p.add_argument("--into", type=Path, default=Path(__file__).resolve().parent.parent / "models" / "longmem-tiny")
    a = p.parse_args()
    old = read_checkpoint_meta(a.into)
    meta = read_checkpoint_meta(a.run)
    if meta["backbone"]["fingerprint"] != old["backbone"]["fingerprint"]:
        raise SystemExit(f"{a.run} was trained on another backbone than {a.into}/backbone; nothing written")
    ref = LongMem.from_pretrained(a.run, backbone=a.into / "backbone").eval()

    shutil.copyfile(a.run / WEIGHTS_FILE, a.into / WEIGHTS_FILE)
    meta = {k: v for k, v in meta.items() if k != "sha256"}
    meta["backbone"] = {**meta["backbone"], "path": "backbone"}
    write_checkpoint_meta(a.into, meta)
    hist = a.into / "history" / a.run.name
    hist.mkdir(parents=True, exist_ok=True)
    for f in ("train_config.json", "loss.png", "metrics.jsonl"):
        if (a.run / f).is_file():
            shutil.copyfile(a.run / f, hist / f)

    got = LongMem.from_pretrained(a.into).eval()
    torch.manual_seed(0)
    ids = torch.randint(0, ref.backbone.model.config.vocab_size, (2, 3 * ref.config.segment_length))
    with torch.no_grad():
        for use_memory in (False, True):
            outs = []
            for m in (ref, got):
                mem = m.new_memory(2) if use_memory else None
                outs.append(torch.cat([m(s, memory=mem).logits for s in ids.split(m.config.segment_length, dim=1)], 1))
            if not torch.equal(*outs):
                raise SystemExit(f"{a.into} does not reproduce {a.run} (memory={use_memory}); restore it from git")
    print(f"{a.into}: SideNet of {a.run} ({json.dumps(meta['config'])}); logits identical with and without memory")


if __name__ == "__main__":
    main()
