"""Train a backbone and two SideNets on one GPU inside a fixed time budget (RECIPE.md, section 7).

The whole pipeline in one process, for a lent GPU of a few minutes (`device` tool): unpack the corpora, build the
copy-rich corpora, measure pretraining throughput, pretrain a backbone of the shipped default's shape for as many
steps as the budget holds (so the cosine schedule ends on time), export it, then adapt two SideNets on it at once
(inner-product and cosine retrieval), each for as many steps as its share of the budget holds. Everything that must
come back is packed into OUT as tar parts under 16 MB (the device's limit per file), backbone first, so a run cut
short still returns the backbone.

    python3 scripts/gpu_default.py --src gpu --work /tmp/w --out "$OUT" --pretrain-s 200 --adapt-s 150
    python3 scripts/gpu_default.py --src gpu --work /tmp/w --out /tmp/o --smoke      # the same path on a CPU, tiny
"""
import argparse
import json
import lzma
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from make_recall_corpus import write_corpus  # noqa: E402

T_START = time.time()


def say(msg: str) -> None:
    print(f"[{time.time() - T_START:7.1f}s] {msg}", flush=True)


def unpack(src: Path, data: Path, smoke: bool, names) -> None:
    for name in names:
        corpus, _, split = name.partition("-")
        dest = data / corpus / f"{split or 'train'}.jsonl"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with lzma.open(src / f"{name}.jsonl.xz", "rt") as f, open(dest, "w") as g:
            for i, line in enumerate(f):
                if smoke and i >= 6:
                    break
                g.write(line)


def recall_corpus(inputs, out: Path, piece_chars, passages, passage_chars, min_back, seed, every=1) -> int:
    return write_corpus(inputs, out, piece_chars, passages, passage_chars, min_back, seed, every)[0]


def pack(paths: list[Path], out: Path, stem: str, part_bytes: int = 15 * 2**20) -> list[str]:
    """tar ``paths`` (folders by name) into OUT/stem.tar.partNN pieces of at most ``part_bytes``."""
    tmp = out.parent / f".{stem}.tar"
    with tarfile.open(tmp, "w") as t:
        for p in paths:
            t.add(p, arcname=p.name)
    names = []
    with open(tmp, "rb") as f:
        for k in range(1000):
            chunk = f.read(part_bytes)
            if not chunk:
                break
            name = f"{stem}.tar.part{k:02d}"
            (out / name).write_bytes(chunk)
            names.append(name)
    tmp.unlink()
    return names


def pretrain_rate(cfg, tokenizer, steps: int) -> float:
    """Tokens per second of the real training step (random tokens), after warm-up."""
    import torch

    from longmem.loading import resolve_device
    from longmem.training.pretrain import build_model
    from longmem.training.step import MicroBatch, Optimization, adamw, train_step

    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).to(device)
    opt = adamw(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay,
                fused=device.type == "cuda")
    optim = Optimization(opt, None, torch.amp.GradScaler(device.type, enabled=False), list(model.parameters()),
                         cfg.grad_clip, torch.bfloat16 if cfg.precision == "bf16" else None)
    x = torch.randint(len(tokenizer), (cfg.batch_size, cfg.seq_len + 1), device=device)

    def step():  # the step `longmem pretrain` runs
        return train_step(model, [MicroBatch(x[:, :-1], x[:, 1:])], optim).loss

    for _ in range(3):
        step()
    t = time.time()
    for _ in range(steps):
        step()
    rate = steps * cfg.batch_size * cfg.seq_len / (time.time() - t)
    del model, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rate


def pretrain_backbone(a, data: Path, work: Path, out: Path) -> Path:
    from longmem.training.pretrain import PretrainConfig, export_backbone, pretrain
    from longmem.loading import load_tokenizer

    # pretraining: code with short-range copies (a copy follows its source within one 1,024-token window)
    n_pre = recall_corpus([data / "code/train.jsonl"], data / "recall/pre.jsonl", 3000, 3, 200, 600, seed=0)
    say(f"pretraining corpora ready: {n_pre} copy pieces")

    tok_dir = Path(__file__).resolve().parent.parent / "models/longmem-tiny/backbone"
    tokenizer = load_tokenizer(str(tok_dir))
    shape = dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=160, seq_len=128, batch_size=4) if a.smoke \
        else dict(seq_len=1024, batch_size=96)
    base = dict(data=[str(data / "pycode/train.jsonl"), str(data / "code/train.jsonl"), str(data / "books/train.jsonl"),
                      str(data / "recall/pre.jsonl")],
                weights=[0.6, 0.17, 0.06, 0.17], tokenizer=str(tok_dir), out=str(work / "pretrain"),
                val_data=[str(data / "books/validation.jsonl"), str(data / "code/validation.jsonl")],
                lr=2e-3, warmup=150, min_lr_ratio=0.1, seed=1234, precision="bf16", **shape)
    probe = PretrainConfig(**{**base, "max_steps": 10})
    rate = pretrain_rate(probe, tokenizer, steps=3 if a.smoke else 15)
    steps = max(20, int(a.pretrain_s * rate / (probe.batch_size * probe.seq_len)))
    say(f"pretrain throughput {rate:,.0f} tok/s -> {steps} steps of {probe.batch_size} x {probe.seq_len}")
    cfg = PretrainConfig(**{**base, "max_steps": steps, "eval_every": max(1, steps // 4), "save_every": max(1, steps // 2),
                            "eval_tokens": 262144, "log_every": 10, "max_minutes": (a.pretrain_s * 1.25 + 30) / 60})
    final = pretrain(cfg, progress=False)
    say(f"pretrain done: {json.dumps(final)}")
    bb = work / "backbone"
    info = export_backbone(cfg.out, bb)
    (bb / "pretrain-config.json").write_text(json.dumps({**json.loads((Path(cfg.out) / "train_config.json").read_text()),
                                                          "throughput_probe_tok_s": round(rate)}, indent=1) + "\n")
    say(f"backbone exported ({info}); packed {pack([bb], out, 'backbone')}")

    return bb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default="gpu", help="folder with the .jsonl.xz corpora")
    p.add_argument("--work", default="/tmp/longmem-gpu")
    p.add_argument("--out", required=True)
    p.add_argument("--pretrain-s", type=float, default=200.0, help="seconds of pretraining")
    p.add_argument("--adapt-s", type=float, default=150.0, help="seconds of adaptation (both runs at once)")
    p.add_argument("--backbone", default=None, help="skip pretraining: adapt SideNets on this backbone folder")
    p.add_argument("--adapt-src", nargs="*", default=None,
                   help="NAME.jsonl.xz files in --src to adapt on (default: the pretraining corpora)")
    p.add_argument("--adapt-steps", type=int, default=None, help="steps per adaptation run (default: from a probe)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes and data: checks the path on a CPU")
    a = p.parse_args()
    import torch

    work, out = Path(a.work), Path(a.out)
    data = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    say(f"torch {torch.__version__}, cuda {torch.cuda.is_available()}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""))
    (data / "recall").mkdir(parents=True, exist_ok=True)
    if a.backbone is None:
        unpack(Path(a.src), data, a.smoke, ("books-train", "books-validation", "code-train", "code-validation", "pycode"))
        bb = pretrain_backbone(a, data, work, out)
    else:  # adaptation only, on a backbone trained before (copied into the tree)
        unpack(Path(a.src), data, a.smoke, ("books-validation", "code-validation"))
        bb = Path(a.backbone)
    if a.adapt_src:  # code the backbone never saw: copies there can only come from the memory
        adapt_inputs = []
        for name in a.adapt_src:
            unpack(Path(a.src), data, a.smoke, (name,))
            adapt_inputs.append(data / name / "train.jsonl")
        n_ad = recall_corpus(adapt_inputs, data / "recall/adapt.jsonl", 24000, 8, 300, 2000, seed=1)
        adapt_files = [data / "recall/adapt.jsonl"]
    else:
        n_ad = recall_corpus([data / "books/train.jsonl", data / "code/train.jsonl"], data / "recall/adapt.jsonl",
                             24000, 8, 300, 2000, seed=1)
        n_ad += recall_corpus([data / "pycode/train.jsonl"], data / "recall/adapt-py.jsonl", 24000, 8, 300, 2000,
                              seed=2, every=4)
        adapt_files = [data / "recall/adapt.jsonl", data / "recall/adapt-py.jsonl"]
    n_val = recall_corpus([data / "books/validation.jsonl", data / "code/validation.jsonl"],
                          data / "recall/validation.jsonl", 24000, 8, 300, 2000, seed=3)
    say(f"adaptation corpora ready: {n_ad} pieces, {n_val} validation pieces")

    # adaptation: two SideNets at once, inner product (the paper) and cosine retrieval
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    common = ["-m", "longmem.cli", "train", "--backbone", str(bb), "--data", *map(str, adapt_files), "--val-data", str(data / "recall/validation.jsonl"),
              "--segment-length", "64" if a.smoke else "256", "--batch-size", "4" if a.smoke else "32",
              "--lr", "8e-4", "--warmup-steps", "100", "--precision", "bf16", "--eval-every", "0",
              "--eval-docs", "8", "--eval-segments", "16", "--no-progress"]
    if a.adapt_steps:
        adapt_steps = a.adapt_steps
    else:
        probe_out = work / "adapt-probe"
        t = time.time()
        subprocess.run([sys.executable, *common, "--out", str(probe_out), "--max-steps", "30", "--save-every", "1000"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        recs = [json.loads(l) for l in open(probe_out / "metrics.jsonl") if '"loss"' in l]
        per_step = (recs[-1]["elapsed_s"] - recs[9]["elapsed_s"]) / (len(recs) - 10)
        adapt_steps = max(20, int(a.adapt_s / per_step * 0.55))  # two runs share the GPU
        say(f"adaptation probe: {per_step * 1000:.0f} ms/step alone ({time.time() - t:.0f} s with set-up)")
    say(f"adaptation: {adapt_steps} steps per run")
    procs = {}
    for metric in ("ip", "cosine"):
        log = open(work / f"adapt-{metric}.log", "w")
        procs[metric] = subprocess.Popen(
            [sys.executable, *common, "--out", str(work / f"sidenet-{metric}"), "--retrieval-metric", metric,
             "--max-steps", str(adapt_steps), "--save-every", str(max(1, adapt_steps // 2)),
             "--max-minutes", str((a.adapt_s + 20) / 60)], env=env, stdout=log, stderr=subprocess.STDOUT)
    for metric, proc in procs.items():
        rc = proc.wait()
        say(f"adaptation {metric}: exit {rc}; " + (work / f"adapt-{metric}.log").read_text().strip().splitlines()[-1][:400])
    keep = []
    for metric in ("ip", "cosine"):
        d = work / f"sidenet-{metric}"
        if (d / "sidenet.safetensors").is_file():
            for junk in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
                subprocess.run(["rm", "-rf", str(d / junk)])
            keep.append(d)
    say(f"packed {pack(keep, out, 'sidenets')}")
    say("done")


if __name__ == "__main__":
    main()
