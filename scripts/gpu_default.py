"""Make a default model whose memory recalls, on one lent GPU, inside one fixed time budget (RECIPE.md section 8).

One process, for one call of the `run` device tool (at most 10 minutes): everything it produces goes into OUT, in at
most 8 files under 16 MiB each (the tool's limits), the backbone first so a run cut short still returns it.

1. Corpora. The project's own (``gpu/*.jsonl.xz``, made by ``longmem data all`` here) plus two Python corpora built on
   the device from its installed packages (``longmem data pycode``): one for pretraining, one ("unseen") that the
   backbone never sees, for adaptation. Copy-rich pieces are made with ``longmem data recall``.
2. Pretraining a larger backbone (Llama 8 x 384, 6 heads / 2 key-value heads, 15.7M parameters; sized below) on the
   natural corpora and a large share of in-window copies (passages repeated after a few hundred tokens, made-up
   lines repeated inside the window), so that it learns to copy in context. The number of steps comes from a
   throughput probe, so that the cosine schedule ends inside the budget. Then the in-context copy check
   (``longmem.eval.induction.copy_in_context``): the loss on an exact repeat inside the window must be well under 1
   nat; the result is recorded either way (``induction_ok``).
3. Adaptation of the SideNet on it with what the CPU runs taught: key search, cosine ranking, the next chunk too
   (``--retrieval-query key --retrieval-metric cosine --retrieval-next``), lr 2e-3, the copy-dense curriculum
   (made-up lines repeated beyond the window), recall pieces, natural unseen code and the novels in the mix; steps
   from a probe, so the linear decay ends inside the budget.
4. The goal measures on the GPU, side by side: ``longmem eval passkey --distances 1000 4000 16000 --trials 20``,
   ``longmem eval ppl`` on the code and books test splits, the memory-copy evaluation
   (``scripts/memory_copy_eval.py --pieces 2``); each one is stopped at the deadline if it runs over.
5. Weights as bf16 safetensors (``LongMem.from_pretrained`` upcasts on load); the reloaded bf16 model is compared
   with the trained one.

Sizing (RECIPE.md): the last GPU pretraining ran at 1.24M tokens/s for 7.9M parameters; ``make demo`` must stay under
60 s on 2 cores (today about 20 s). On 2 shared cores a forward of 256 tokens of the 15.7M shape took 1.3x the time
of the 7.9M shape (2x its FLOPs), so the demo stays well inside its budget.

    python3 scripts/gpu_default.py --src gpu --work /tmp/w --out "$OUT" --budget-s 540
    python3 scripts/gpu_default.py --src gpu --work /tmp/w --out /tmp/o --smoke      # the same path on a CPU, tiny
"""
import argparse
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from longmem import LongMem
from longmem.data.pycode import write_package_code
from longmem.data.recall import write_dense_corpus, write_recall_corpus
from longmem.eval.induction import copy_in_context
from longmem.loading import TINY_MODEL, load_tokenizer, resolve_device
from longmem.training.pretrain import PretrainConfig, build_model, export_backbone, pretrain
from longmem.training.step import MicroBatch, Optimization, adamw, train_step

ROOT = Path(__file__).resolve().parent.parent
T_START = time.time()
PART_BYTES = 16 * 2**20 - 2**16  # the device returns files of at most 16 MiB
CORPORA = ("books-train", "books-validation", "books-test", "code-train", "code-validation", "code-test")
PRETRAIN_PACKAGES = ("torch", "transformers", "numpy", "matplotlib", "networkx", "pip", "setuptools", "jinja2")
UNSEEN_PACKAGES = ("sympy", "pandas", "xarray", "fontTools", "pygments", "huggingface_hub", "mpmath", "pydantic",
                   "_pytest", "rich", "PIL", "fsspec", "packaging", "filelock", "pyparsing", "scipy", "sklearn")
# the smoke run: what a CPU development machine has installed, a few files of each
SMOKE_PRETRAIN_PACKAGES, SMOKE_UNSEEN_PACKAGES = ("jinja2",), ("markupsafe", "safetensors", "tqdm", "filelock")

FULL = dict(
    shape=dict(layers=8, hidden=384, heads=6, kv_heads=2, intermediate=1024, seq_len=1024, batch_size=64),
    pretrain_lr=2e-3, pretrain_warmup=200, adapt_batch=64, adapt_segment=256, adapt_lr=2e-3, adapt_warmup=100,
    memory_layer=5, passkey=["--distances", "1000", "4000", "16000", "--trials", "20"], copy_pieces=2,
    copy_piece_chars=8000, copy_min_back=3000, dense_docs=8000, rate_steps=15, adapt_probe_steps=30,
    eval_tokens=262144, adapt_eval=["--eval-docs", "8", "--eval-segments", "16"], evals=4,
)
SMOKE = dict(
    shape=dict(layers=2, hidden=64, heads=4, kv_heads=2, intermediate=160, seq_len=128, batch_size=4),
    pretrain_lr=2e-3, pretrain_warmup=5, adapt_batch=4, adapt_segment=64, adapt_lr=2e-3, adapt_warmup=5,
    memory_layer=1, passkey=["--distances", "300", "600", "--trials", "2"], copy_pieces=1,
    copy_piece_chars=5000, copy_min_back=2000, dense_docs=40, rate_steps=3, adapt_probe_steps=8,
    eval_tokens=4096, adapt_eval=["--eval-docs", "2", "--eval-segments", "4"], evals=1,
)


def say(msg: str) -> None:
    print(f"[{time.time() - T_START:7.1f}s] {msg}", flush=True)


def left(deadline: float) -> float:
    return deadline - time.time()


# --------------------------------------------------------------------------- files


def unpack(src: Path, data: Path, smoke: bool) -> None:
    """``src/NAME-SPLIT.jsonl.xz`` -> ``data/NAME/SPLIT.jsonl`` (smoke: the first documents, cut short)."""
    for name in CORPORA:
        corpus, _, split = name.partition("-")
        dest = data / corpus / f"{split}.jsonl"
        dest.parent.mkdir(parents=True, exist_ok=True)
        with lzma.open(src / f"{name}.jsonl.xz", "rt") as f, open(dest, "w") as g:
            for i, line in enumerate(f):
                if smoke:
                    if i >= 4:
                        break
                    doc = json.loads(line)
                    line = json.dumps({**doc, "text": doc["text"][:60000]}) + "\n"
                g.write(line)


def head(path: Path, n: int) -> Path:
    """Keep the first ``n`` lines of a JSONL file (smoke runs)."""
    lines = path.read_text().splitlines(keepends=True)[:n]
    path.write_text("".join(lines))
    return path


def cap(path: Path, max_chars: int) -> Path:
    """Keep the first documents of a JSONL file up to about ``max_chars`` characters of text (tokenizing time)."""
    kept, n = [], 0
    with open(path) as f:
        for line in f:
            if n >= max_chars:
                break
            kept.append(line)
            n += len(line)
    path.write_text("".join(kept))
    return path


def split_halves(src: Path, a: Path, b: Path) -> None:
    """Documents by ``sha1(id) % 2``: half A (natural code in the adaptation mix), half B (copy curricula)."""
    with open(src) as f, open(a, "w") as fa, open(b, "w") as fb:
        for line in f:
            h = int(hashlib.sha1(json.loads(line)["id"].encode()).hexdigest(), 16) % 2
            (fb if h else fa).write(line)


def pack(paths: list[Path], out: Path, stem: str) -> list[str]:
    """tar ``paths`` (by name) into ``OUT/stem.tar.partNN`` pieces under the device's limit per file."""
    tmp = out.parent / f".{stem}.tar"
    with tarfile.open(tmp, "w") as t:
        for p in paths:
            t.add(p, arcname=p.name)
    names = []
    with open(tmp, "rb") as f:
        for k in range(100):
            chunk = f.read(PART_BYTES)
            if not chunk:
                break
            (out / f"{stem}.tar.part{k:02d}").write_bytes(chunk)
            names.append(f"{stem}.tar.part{k:02d}")
    tmp.unlink()
    return names


def texts(paths) -> list[str]:
    return [json.loads(line)["text"] for p in paths for line in open(p)]


# --------------------------------------------------------------------------- pretraining


def pretrain_rate(cfg: PretrainConfig, tokenizer, steps: int) -> float:
    """Tokens per second of the pretraining step (random tokens, after warm-up)."""
    device = resolve_device(cfg.device)
    torch.manual_seed(0)
    model = build_model(cfg, tokenizer).to(device)
    opt = adamw(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
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
    return steps * cfg.batch_size * cfg.seq_len / (time.time() - t)


def pretrain_backbone(a, p: dict, data: Path, work: Path, out: Path, summary: dict) -> Path:
    # copies inside one window: pieces of 3,000 characters + 3 passages of 200 copied from them + 3 made-up lines;
    # copy-dense documents with 10 made-up lines repeated ~1,500 characters (~500 tokens) later
    sources = [data / "code/train.jsonl", data / "pycode/half-pre.jsonl"]
    n_copy = write_recall_corpus(sources, data / "pre/copies.jsonl", 3000, 3, 200, 600, seed=0, random_lines=3)[0]
    n_dense = write_dense_corpus([data / "pycode/train.jsonl"], data / "pre/dense.jsonl", p["dense_docs"], 10, seed=1)[0]
    n_books = write_recall_corpus([data / "books/train.jsonl"], data / "pre/books-copies.jsonl", 3000, 2, 200, 600,
                                  seed=2)[0]
    say(f"pretraining corpora: {n_copy} copy pieces, {n_dense} dense documents, {n_books} book copy pieces")
    tok_dir = TINY_MODEL / "backbone"  # the project's BPE (8,192 entries, stdlib code and novels)
    tokenizer = load_tokenizer(str(tok_dir))
    base = dict(data=[str(data / "pycode/train.jsonl"), str(data / "code/train.jsonl"), str(data / "books/train.jsonl"),
                      str(data / "pre/copies.jsonl"), str(data / "pre/dense.jsonl"), str(data / "pre/books-copies.jsonl")],
                weights=[0.35, 0.1, 0.1, 0.2, 0.15, 0.1], tokenizer=str(tok_dir), out=str(work / "pretrain"),
                val_data=[str(data / "books/validation.jsonl"), str(data / "code/validation.jsonl")],
                lr=p["pretrain_lr"], warmup=p["pretrain_warmup"], min_lr_ratio=0.1, seed=1234, precision="bf16",
                max_position=2048, **p["shape"])
    probe = PretrainConfig(**{**base, "max_steps": 10})
    rate = pretrain_rate(probe, tokenizer, steps=p["rate_steps"])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the probe's model and optimizer
    tokens_per_step = probe.batch_size * probe.seq_len
    steps = max(20, int(a.pretrain_s * rate / tokens_per_step))
    if a.smoke:
        steps = 20
    say(f"pretrain throughput {rate:,.0f} tok/s -> {steps} steps of {probe.batch_size} x {probe.seq_len}")
    cfg = PretrainConfig(**{**base, "max_steps": steps, "eval_every": max(1, steps // p["evals"]),
                            "save_every": max(1, steps // 2), "eval_tokens": p["eval_tokens"], "log_every": 10,
                            "max_minutes": (a.pretrain_s * 1.15 + 20) / 60})
    final = pretrain(cfg, progress=False)
    say(f"pretrain done: {json.dumps(final)}")
    exported = work / "backbone-fp32"
    info = export_backbone(cfg.out, exported)
    model = AutoModelForCausalLM.from_pretrained(exported).eval().to(resolve_device("auto"))
    copy = copy_in_context(model, tokenizer, texts([data / "books/validation.jsonl", data / "code/validation.jsonl"]),
                           passages=8 if not a.smoke else 1)
    summary["pretrain"] = {**final, **info, "throughput_probe_tok_s": round(rate), "tokens_per_step": tokens_per_step,
                           "parameters": sum(q.numel() for q in model.parameters()), "shape": p["shape"],
                           "weights": base["weights"], "data": base["data"]}
    summary["copy_in_context"] = {**copy, "induction_ok": bool(copy["loss_repeat"] < 1.0)}
    say(f"copy in context (validation): {json.dumps(summary['copy_in_context'])}")
    bb = work / "backbone"  # the shipped form: bf16 safetensors, tokenizer, pretraining logs
    model.to(torch.bfloat16).save_pretrained(bb)
    tokenizer.save_pretrained(bb)
    for name in ("pretrain-metrics.jsonl", "pretrain-loss.png"):
        if (exported / name).is_file():
            shutil.copy(exported / name, bb / name)
    (bb / "pretrain-config.json").write_text(json.dumps({**json.loads((Path(cfg.out) / "train_config.json").read_text()),
                                                          "throughput_probe_tok_s": round(rate)}, indent=1) + "\n")
    (bb / "copy-in-context.json").write_text(json.dumps(summary["copy_in_context"], indent=1) + "\n")
    say(f"backbone saved as bf16; packed {pack([bb], out, 'backbone')}")
    del model
    return bb


# --------------------------------------------------------------------------- adaptation


def adaptation_corpora(p: dict, data: Path) -> tuple[list[Path], list[Path]]:
    """The CPU curriculum in one mix (RECIPE.md section 6): copy-dense documents, recall pieces with made-up lines,
    natural unseen code, the novels (six times, as in the run that shipped v3), and book recall pieces."""
    d = data / "adapt"
    b = data / "unseen/half-b.jsonl"
    n_dense = write_dense_corpus([b], d / "dense.jsonl", p["dense_docs"] // 4, 25, seed=10)[0]
    n_mem = write_recall_corpus([b], d / "memcopy.jsonl", 6000, 2, 300, 1500, seed=11, random_lines=4)[0]
    n_bk = write_recall_corpus([data / "books/train.jsonl"], d / "books-memcopy.jsonl", 6000, 2, 300, 1500, seed=12,
                               random_lines=2)[0]
    write_recall_corpus([data / "code/validation.jsonl"], d / "val-memcopy.jsonl", 6000, 2, 300, 1500, seed=13,
                        random_lines=4)
    say(f"adaptation corpora: {n_dense} dense, {n_mem} code recall pieces, {n_bk} book recall pieces")
    books = data / "books/train.jsonl"
    train = [d / "dense.jsonl", d / "memcopy.jsonl", data / "unseen/half-a.jsonl", d / "books-memcopy.jsonl",
             *[books] * 6]
    return train, [d / "val-memcopy.jsonl", data / "books/validation.jsonl"]


def adapt(a, p: dict, bb: Path, data: Path, work: Path, env: dict, summary: dict, until: float) -> Path:
    train, val = adaptation_corpora(p, data)
    common = [sys.executable, "-m", "longmem.cli", "train", "--backbone", str(bb), "--data", *map(str, train),
              "--val-data", *map(str, val), "--segment-length", str(p["adapt_segment"]),
              "--batch-size", str(p["adapt_batch"]), "--memory-size", "65536", "--chunk-size", "4",
              "--topk-chunks", "16", "--memory-layer", str(p["memory_layer"]), "--retrieval-query", "key",
              "--retrieval-metric", "cosine", "--retrieval-next", "--lr", str(p["adapt_lr"]),
              "--warmup-steps", str(p["adapt_warmup"]), "--precision", "bf16", *p["adapt_eval"],
              "--no-progress", "--seed", "0"]
    probe_out = work / "adapt-probe"
    t = time.time()
    subprocess.run([*common, "--out", str(probe_out), "--max-steps", str(p["adapt_probe_steps"]), "--eval-every", "0",
                    "--save-every", "100000"], check=True, env=env, stdout=subprocess.DEVNULL)
    recs = [json.loads(line) for line in open(probe_out / "metrics.jsonl") if '"loss"' in line]
    skip = len(recs) // 3  # warm-up steps
    per_step = (recs[-1]["elapsed_s"] - recs[skip]["elapsed_s"]) / max(1, recs[-1]["step"] - recs[skip]["step"])
    seconds = min(a.adapt_s, left(until) - 30)  # 30 s: the run's own set-up (tokenizing) before its first step
    steps = max(20, int(seconds / per_step))
    if a.smoke:
        steps = 16
    say(f"adaptation probe: {per_step * 1000:.0f} ms/step ({time.time() - t:.0f} s with set-up) -> {steps} steps")
    run = work / "sidenet"
    with open(work / "adapt.log", "w") as log:
        rc = subprocess.run([*common, "--out", str(run), "--max-steps", str(steps), "--eval-every", str(max(1, steps // p["evals"])),
                             "--save-every", str(max(1, steps // 2)), "--max-minutes", str(max(0.5, (left(until) - 25) / 60))],
                            env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    tail = (work / "adapt.log").read_text().strip().splitlines()[-1:] or [""]
    say(f"adaptation: exit {rc}; {tail[0][:300]}")
    if rc:
        raise SystemExit(f"adaptation failed (exit {rc}); see adapt.log")
    summary["adapt"] = {"steps_planned": steps, "probe_ms_per_step": round(per_step * 1000, 1),
                        "data": [str(x) for x in train], "last": tail[0][:500]}
    return run


def ship_form(run: Path, bb: Path, work: Path, summary: dict) -> Path:
    """The model as it would ship: SideNet and backbone weights in bf16 (``from_pretrained`` upcasts on load), in one
    relocatable folder; reloaded and compared with the trained model."""
    trained = LongMem.from_pretrained(run, backbone=str(bb)).eval()
    tokenizer = load_tokenizer(str(bb))
    ids = torch.tensor([tokenizer.encode("def main():\n    return 0\n" * 8)[:64]])
    with torch.no_grad():
        want = trained(ids.to(trained.device)).logits.float().cpu()
    final = work / "longmem-gpu"
    shutil.rmtree(final, ignore_errors=True)
    trained.sidenet.to(torch.bfloat16)
    trained.backbone.model.to(torch.bfloat16)
    trained.save_pretrained(final, save_backbone=True, tokenizer=tokenizer)
    with torch.no_grad():
        got = LongMem.from_pretrained(final).eval()(ids).logits.float()
    diff = (want - got).abs().max().item()
    summary["bf16_reload_max_logit_diff"] = round(diff, 4)
    say(f"shipped form in {final}; bf16 reload vs trained: max logit difference {diff:.4f}")
    return final


# --------------------------------------------------------------------------- evaluation


def evaluate(a, p: dict, model_dir: Path, data: Path, work: Path, env: dict, deadline: float, summary: dict) -> None:
    """The goal measures as separate processes at once (the GPU is far from busy with one); any still running at
    the deadline is stopped and recorded as such."""
    res = work / "results"
    res.mkdir(exist_ok=True)
    cli = [sys.executable, "-m", "longmem.cli", "eval"]
    smoke_tokens = ["--max-tokens", "3000"] if a.smoke else []
    jobs = {
        "passkey": [*cli, "passkey", "--model", str(model_dir), *p["passkey"], "--json", str(res / "passkey.json"),
                    "--no-progress"],
        "ppl_code_test": [*cli, "ppl", "--model", str(model_dir), "--data", str(data / "code/test.jsonl"),
                          *smoke_tokens, "--json", str(res / "ppl_code_test.json"), "--no-progress"],
        "ppl_books_test": [*cli, "ppl", "--model", str(model_dir), "--data", str(data / "books/test.jsonl"),
                           *smoke_tokens, "--json", str(res / "ppl_books_test.json"), "--no-progress"],
        "memory_copy": [sys.executable, str(ROOT / "scripts/memory_copy_eval.py"), "--model", str(model_dir),
                        "--data", str(data / "code/test.jsonl"), str(data / "books/test.jsonl"),
                        "--pieces", str(p["copy_pieces"]), "--piece-chars", str(p["copy_piece_chars"]),
                        "--min-back", str(p["copy_min_back"]), "--json", str(res / "memory_copy.json")],
    }
    procs = {}
    for name, cmd in jobs.items():
        procs[name] = (subprocess.Popen(cmd, env=env, stdout=open(res / f"{name}.log", "w"), stderr=subprocess.STDOUT),
                       time.time())
    status = {}
    while len(status) < len(procs):
        for name, (proc, t0) in procs.items():
            if name in status:
                continue
            rc = proc.poll()
            if rc is None and left(deadline) > 0:
                continue
            if rc is None:
                proc.kill()
                proc.wait()
            status[name] = {"exit": rc, "seconds": round(time.time() - t0, 1)}
            if rc is None:
                status[name]["stopped_at_deadline"] = True
            out = res / f"{name}.json"
            if out.is_file():
                status[name]["result"] = json.loads(out.read_text())
            say(f"eval {name}: {json.dumps({k: v for k, v in status[name].items() if k != 'result'})}")
        time.sleep(1)
    summary["eval"] = status


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="gpu", help="folder with the NAME-SPLIT.jsonl.xz corpora (`longmem data all`)")
    ap.add_argument("--work", default="/tmp/longmem-gpu", help="scratch folder (corpora, runs)")
    ap.add_argument("--out", required=True, help="what comes back: at most 8 files under 16 MiB")
    ap.add_argument("--budget-s", type=float, default=540.0, help="wall seconds for the whole run (default: 540)")
    ap.add_argument("--pretrain-s", type=float, default=None, help="seconds of pretraining (default: 38%% of budget)")
    ap.add_argument("--adapt-s", type=float, default=None,
                    help="seconds of adaptation at most (default: what is left before the evaluation's share)")
    ap.add_argument("--eval-s", type=float, default=None, help="seconds kept for evaluation (default: 20%% of budget)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and data: checks the whole path on a CPU")
    a = ap.parse_args()
    a.pretrain_s = a.pretrain_s if a.pretrain_s is not None else 0.38 * a.budget_s
    a.adapt_s = a.adapt_s if a.adapt_s is not None else a.budget_s
    a.eval_s = a.eval_s if a.eval_s is not None else 0.2 * a.budget_s
    p = SMOKE if a.smoke else FULL
    deadline = T_START + a.budget_s
    work, out = Path(a.work), Path(a.out)
    data = work / "data"
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    summary = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "smoke": a.smoke,
               "budget_s": a.budget_s, "pretrain_s": a.pretrain_s, "adapt_s": a.adapt_s}
    say(json.dumps(summary))
    try:
        unpack(Path(a.src), data, a.smoke)
        pre = write_package_code(data / "pycode/train.jsonl", SMOKE_PRETRAIN_PACKAGES if a.smoke else PRETRAIN_PACKAGES,
                                 skip_missing=True)
        unseen = write_package_code(data / "unseen/all.jsonl", SMOKE_UNSEEN_PACKAGES if a.smoke else UNSEEN_PACKAGES,
                                    skip_missing=True)
        if a.smoke:
            head(data / "pycode/train.jsonl", 12)
            head(data / "unseen/all.jsonl", 16)
        # pretraining code that also feeds the copy pieces: every third file
        with open(data / "pycode/train.jsonl") as f, open(data / "pycode/half-pre.jsonl", "w") as g:
            g.writelines(line for i, line in enumerate(f) if i % 6 == 0)
        split_halves(data / "unseen/all.jsonl", data / "unseen/half-a.jsonl", data / "unseen/half-b.jsonl")
        for half in ("half-a", "half-b"):  # as the CPU runs (20 MB of natural code): tokenized twice, keep it short
            cap(data / f"unseen/{half}.jsonl", 20_000_000)
        summary["corpora"] = {"pycode": {k: pre[k] for k in ("packages", "missing", "documents", "characters")},
                              "unseen": {k: unseen[k] for k in ("packages", "missing", "documents", "characters")}}
        say(f"code corpora: pretraining {pre['characters']:,} characters, unseen {unseen['characters']:,}")

        bb = pretrain_backbone(a, p, data, work, out, summary)
        run = adapt(a, p, bb, data, work, env, summary, until=deadline - a.eval_s)
        final = ship_form(run, bb, work, summary)
        side = work / "sidenet-pack"  # the model folder without its backbone (that came back first)
        shutil.rmtree(side, ignore_errors=True)
        side.mkdir()
        for name in ("longmem.json", "sidenet.safetensors"):
            shutil.copy(final / name, side / name)
        for name in ("metrics.jsonl", "loss.png", "train_config.json", "config.json"):
            if (run / name).is_file():
                shutil.copy(run / name, side / f"adapt-{name}")
        # files at the archive's root: both archives unpacked into one folder give the model folder
        say(f"packed {pack(sorted(side.iterdir()), out, 'sidenet')}")
        evaluate(a, p, final, data, work, env, deadline - 15, summary)
    finally:
        summary["seconds"] = round(time.time() - T_START, 1)
        logs = [x for x in (work / "results", work / "adapt.log", work / "pretrain" / "metrics.jsonl") if x.exists()]
        if logs:
            say(f"packed {pack(logs, out, 'results')}")
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        say(f"done in {summary['seconds']} s")


if __name__ == "__main__":
    main()
