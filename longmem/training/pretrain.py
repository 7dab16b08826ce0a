"""Pretrain a small Llama-style backbone from scratch on CPU; measure perplexity.

The loop is visible: sample random windows of ``seq_len + 1`` tokens from the token streams of
the training sets (each batch row picks its set uniformly, so a small corpus is not drowned by a
large one), next-token cross-entropy, AdamW with linear warmup then cosine decay to
``min_lr_ratio * lr``, gradient clipping, bf16 autocast on CPU. Every ``save_every`` steps the
full state (model, optimizer, scheduler, sampler and torch RNG, step) goes to
``OUT/checkpoint/state.pt`` (atomically), so a killed run restarted with ``--resume`` continues
exactly as if it had never stopped.

Outputs in ``OUT``: ``config.json`` + ``model.safetensors`` + tokenizer files (load with
``AutoModelForCausalLM`` / ``AutoTokenizer``), ``metrics.jsonl`` (one record per log/eval),
``loss.png``, and ``checkpoint/`` (drop it when shipping the model).

Token streams: each document is encoded in newline-cut pieces (``encode_batch``) and followed by
``<|endoftext|>``; the stream of a data set is all its documents in order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from longmem.data.streams import encode_documents
from longmem.errors import LongMemError
from longmem.plots import plot_loss_curves
from longmem.io import atomic_write
from longmem.loading import load_tokenizer, resolve_device
from longmem.model import next_token_loss
from longmem.training.step import MicroBatch, Optimization, adamw, rng_state, schedule, set_rng_state, train_step

# fields that define the network: a checkpoint resumes only into the same ones
_SHAPE_FIELDS = ("layers", "hidden", "heads", "kv_heads", "intermediate", "seq_len",
                 "max_position", "rope_theta")


@dataclass
class PretrainConfig:
    data: list[str]
    tokenizer: str
    out: str
    val_data: list[str] | None = None  # None: the validation.jsonl next to each train.jsonl
    # model shape (LlamaConfig)
    layers: int = 8
    hidden: int = 256
    heads: int = 8
    kv_heads: int = 4  # grouped-query attention: 2 query heads share one key/value head
    intermediate: int = 688  # ~ 8/3 * hidden rounded to a multiple of 16 (SwiGLU)
    seq_len: int = 512
    max_position: int = 2048  # RoPE extrapolates; LongMem reads longer contexts via memory
    rope_theta: float = 10000.0
    # optimisation
    batch_size: int = 8  # 8 x 512 measured faster per token than 16 x 512 on 2 cores
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    warmup: int = 200
    weight_decay: float = 0.1  # on matrices only, not norms
    grad_clip: float = 1.0
    max_steps: int = 2000  # ~50 min at ~2.9K tok/s (bf16, 2 cores)
    max_minutes: float | None = None  # wall budget of this invocation; stops cleanly
    seed: int = 1234
    precision: str = "bf16"  # bf16 autocast (CPU with avx512_bf16: ~2x faster) or fp32
    device: str = "auto"  # "auto": cuda when available, else cpu
    weights: list[float] | None = None  # sampling weight of each --data set (None: uniform)
    # bookkeeping
    eval_every: int = 200
    eval_tokens: int = 65536  # per validation set; windows from its start, deterministic
    save_every: int = 100
    log_every: int = 10
    resume: bool = False
    init_from: str | None = None  # start from this model folder's weights (same shape) instead of a random init

    def __post_init__(self):
        if not self.data:
            raise LongMemError("no --data given; pass one or more training files or folders")
        for name in ("layers", "hidden", "heads", "kv_heads", "intermediate", "seq_len",
                     "max_position", "batch_size", "max_steps", "eval_every", "eval_tokens",
                     "save_every", "log_every"):
            if getattr(self, name) < 1:
                raise LongMemError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.hidden % self.heads:
            raise LongMemError(f"--hidden {self.hidden} is not divisible by --heads {self.heads}")
        if self.heads % self.kv_heads:
            raise LongMemError(f"--heads {self.heads} is not divisible by --kv-heads {self.kv_heads}")
        if (self.hidden // self.heads) % 2:
            raise LongMemError(f"head size {self.hidden // self.heads} must be even for RoPE")
        if self.seq_len > self.max_position:
            raise LongMemError(f"--seq-len {self.seq_len} exceeds max positions {self.max_position}")
        if not (0 < self.lr < 1):
            raise LongMemError(f"--lr must be in (0, 1), got {self.lr}")
        if self.warmup < 0 or not (0 <= self.min_lr_ratio <= 1):
            raise LongMemError(f"bad schedule: warmup {self.warmup}, min_lr_ratio {self.min_lr_ratio}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise LongMemError(f"--max-minutes must be > 0, got {self.max_minutes}")
        if self.precision not in ("bf16", "fp32"):
            raise LongMemError(f"--precision must be bf16 or fp32, got {self.precision!r}")
        if self.weights is not None:
            if len(self.weights) != len(self.data):
                raise LongMemError(f"--weights has {len(self.weights)} values for {len(self.data)} --data sets; "
                                   "give one weight per set")
            if any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
                raise LongMemError(f"--weights must be finite, >= 0 and not all 0, got {self.weights}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise LongMemError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


# --------------------------------------------------------------------------- data


def token_stream(path: str, tokenizer, batch: int = 256) -> np.ndarray:
    """All documents at ``path`` as one int32 token array, each followed by the eos token.

    Pieces of many documents go to the tokenizer together, so its threads share the work even when each
    document is a single piece (a code file)."""
    eos = np.asarray([tokenizer.eos_token_id], dtype=np.int32)
    docs = encode_documents(path, tokenizer, min_tokens=0, batch=batch, allow_empty=True)
    return np.concatenate([part for d in docs for part in (d, eos)]) if docs else np.zeros(0, dtype=np.int32)


def _name(path: str) -> str:
    p = Path(path)
    return f"{p.parent.name}/{p.stem}" if p.suffix == ".jsonl" else p.name or str(p)


def _default_val(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        q = Path(p)
        if q.name == "train.jsonl" and (q.parent / "validation.jsonl").is_file():
            out.append(str(q.parent / "validation.jsonl"))
    return out


def sample_batch(streams: list[torch.Tensor], batch_size: int, seq_len: int,
                 gen: torch.Generator, weights: list[float] | None = None) -> torch.Tensor:
    """(B, seq_len + 1) random windows; each row's stream is chosen uniformly, or in proportion to ``weights``."""
    if weights is None:
        which = torch.randint(len(streams), (batch_size,), generator=gen)
    else:
        which = torch.multinomial(torch.tensor(weights, dtype=torch.float64), batch_size, replacement=True,
                                  generator=gen)
    rows = []
    for s in which.tolist():
        start = int(torch.randint(len(streams[s]) - seq_len, (1,), generator=gen))
        rows.append(streams[s][start:start + seq_len + 1])
    return torch.stack(rows).long()


# --------------------------------------------------------------------------- model


def build_model(cfg: PretrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM  # loads Llama's modeling code (seconds): only here

    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_position,
        rope_theta=cfg.rope_theta, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos,
    )
    return LlamaForCausalLM(config)


def load_init(model, folder: str) -> None:
    """Continue pretraining from the weights of a model folder (``export-backbone`` output) of the same shape."""
    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise LongMemError(f"--init-from {folder}: no model.safetensors there; give a folder written by export-backbone")
    state = load_file(str(path))
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied embeddings are saved once
    mine = model.state_dict()
    bad = sorted(k for k in set(mine) | set(state) if k not in state or k not in mine or state[k].shape != mine[k].shape)
    if bad:
        raise LongMemError(f"--init-from {folder} does not have this model's shape (first mismatch: {bad[0]}); "
                           "pass the same --layers/--hidden/--heads/--kv-heads/--intermediate it was trained with")
    model.load_state_dict(state)


def lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of (B, T + 1) windows."""
    x, y = windows[:, :-1], windows[:, 1:]  # (B, T) each
    return next_token_loss(model(input_ids=x).logits, y, shifted=True)  # logits (B, T, V)


@torch.no_grad()
def evaluate(model, stream: torch.Tensor, seq_len: int, max_tokens: int | None,
             batch_size: int = 8, precision: str = "fp32") -> tuple[float, int]:
    """Mean loss over non-overlapping windows from the start of ``stream``.

    Returns (mean loss per predicted token, number of predicted tokens).
    """
    n = (len(stream) - 1) // seq_len
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq_len))
    if n < 1:
        raise LongMemError(f"evaluation text has {len(stream)} tokens, fewer than one window of "
                           f"{seq_len + 1}; use more text or a smaller --seq-len")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for i in range(0, n, batch_size):
        idx = range(i, min(n, i + batch_size))
        windows = torch.stack([stream[j * seq_len: j * seq_len + seq_len + 1] for j in idx]).long()
        windows = windows.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            total += lm_loss(model, windows).item() * len(idx)
    model.train(was_training)
    return total / n, n * seq_len


# --------------------------------------------------------------------------- saving


def save_model(model, tokenizer, out: Path) -> None:
    """``save_pretrained`` model (safetensors) + tokenizer into ``out`` via a temporary folder."""
    tmp = out / ".export.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for f in sorted(tmp.iterdir()):
        os.replace(f, out / f.name)
    tmp.rmdir()


def save_checkpoint(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def plot_losses(records: list[dict], path: Path) -> None:
    """The run's learning curves: training loss by step and each ``val/...`` loss."""
    keys = sorted({k for r in records for k in r if k.startswith("val/")})
    plot_loss_curves(path, [(r["step"], r["loss"]) for r in records if "loss" in r],
                     {key: [(r["step"], r[key]) for r in records if key in r] for key in keys})


# --------------------------------------------------------------------------- training


@dataclass
class PretrainRun:
    """Everything one pretraining run carries from step to step (what a checkpoint saves, and its files)."""

    cfg: PretrainConfig
    out: Path
    tokenizer: object
    model: torch.nn.Module
    optim: Optimization
    gen: torch.Generator  # the batch sampler's RNG
    train_streams: list
    val_streams: dict
    records: list = field(default_factory=list)
    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint" / "state.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"


def pretrain(cfg: PretrainConfig, progress: bool = True) -> dict:
    """Train (or resume) the backbone described by ``cfg``; return the last metrics record."""
    run = set_up(cfg, progress)
    start, stop_reason = time.monotonic(), "max_steps"
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="pretrain", disable=not progress, mininterval=5, dynamic_ncols=True)
    window_loss, window_tokens, window_t0 = 0.0, 0, time.monotonic()
    n_tok = cfg.batch_size * cfg.seq_len
    while run.step < cfg.max_steps:
        if cfg.max_minutes is not None and time.monotonic() - start > cfg.max_minutes * 60:
            stop_reason = "max_minutes"
            break
        t0 = time.monotonic()
        windows = sample_batch(run.train_streams, cfg.batch_size, cfg.seq_len, run.gen, cfg.weights)
        stats = train_step(run.model, [MicroBatch(windows[:, :-1], windows[:, 1:])], run.optim)
        if not stats.finite:
            raise LongMemError(f"loss became {stats.loss} at step {run.step}; the last checkpoint is kept in {run.out}/checkpoint. "
                               "Lower --lr or use --precision fp32")
        run.step += 1
        run.tokens_seen += n_tok
        run.train_seconds += time.monotonic() - t0
        window_loss, window_tokens = window_loss + stats.loss, window_tokens + n_tok
        bar.update(1)
        if run.step % cfg.log_every == 0 or run.step % cfg.eval_every == 0 or run.step == cfg.max_steps:
            tps = window_tokens / max(1e-9, time.monotonic() - window_t0)
            rec = {"step": run.step, "loss": round(window_loss / (window_tokens // n_tok), 4),
                   "lr": run.optim.scheduler.get_last_lr()[0], "grad_norm": round(stats.grad_norm, 3),
                   "tokens": run.tokens_seen, "tok_per_s": round(tps, 1), "seconds": round(run.train_seconds, 1)}
            bar.set_postfix(loss=rec["loss"], tok_s=int(tps), lr=f"{rec['lr']:.2e}")
            if run.step % cfg.eval_every == 0 and run.val_streams:
                rec.update(validate(run))
                bar.write(" ".join(f"{k}={v}" for k, v in rec.items()))
                plot_losses(run.records + [rec], run.out / "loss.png")
            log(run, rec)
            window_loss, window_tokens, window_t0 = 0.0, 0, time.monotonic()
        if run.step % cfg.save_every == 0:
            checkpoint(run)
    bar.close()
    return finish(run, stop_reason)


def set_up(cfg: PretrainConfig, progress: bool) -> PretrainRun:
    """Data (checked before anything is written), model, optimizer; the checkpoint's state when resuming."""
    torch.set_num_threads(os.cpu_count() or 1)
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint" / "state.pt"
    if ckpt_path.exists() and not cfg.resume:
        raise LongMemError(f"{out} already holds a checkpoint; pass --resume to continue it or "
                           "choose another --out")
    device = resolve_device(cfg.device)  # before the (long) tokenization
    tokenizer = load_tokenizer(cfg.tokenizer)
    train_streams, val_streams = load_streams(cfg, tokenizer, progress)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tokenizer)
    resuming = cfg.resume and ckpt_path.exists()
    if cfg.init_from and not resuming:
        load_init(model, cfg.init_from)
    model.to(device)
    opt = adamw(model.parameters(), cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay)
    sched = schedule(opt, warmup=cfg.warmup, total=cfg.max_steps, decay="cosine", final=cfg.min_lr_ratio)
    amp = torch.bfloat16 if cfg.precision == "bf16" else None
    optim = Optimization(opt, sched, torch.amp.GradScaler(device.type, enabled=False), list(model.parameters()),
                         cfg.grad_clip, amp)
    run = PretrainRun(cfg, out, tokenizer, model, optim, torch.Generator().manual_seed(cfg.seed), train_streams, val_streams)
    out.mkdir(parents=True, exist_ok=True)
    if resuming:
        resume(run, device)
    atomic_write(run.metrics_path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in run.records)))
    atomic_write(out / "train_config.json", lambda tmp: Path(tmp).write_text(json.dumps(asdict(cfg), indent=2)))
    model.train()
    return run


def load_streams(cfg: PretrainConfig, tokenizer, progress: bool) -> tuple[list, dict]:
    """The training streams (one per data set) and the validation streams, each long enough for a window."""
    train_streams, val_streams = [], {}
    for p in tqdm(cfg.data, desc="tokenizing train", disable=not progress):
        s = torch.from_numpy(token_stream(p, tokenizer))
        if len(s) < cfg.seq_len + 1:
            raise LongMemError(f"{p} has {len(s)} tokens, fewer than one training sequence of "
                               f"{cfg.seq_len + 1}; give more text or a smaller --seq-len")
        train_streams.append(s)
    total = sum(len(s) for s in train_streams)
    if cfg.batch_size * cfg.seq_len > total:  # before anything is written (and before an enormous batch is allocated)
        raise LongMemError(f"a batch of --batch-size {cfg.batch_size} x --seq-len {cfg.seq_len} tokens is more than the "
                           f"training data holds ({total}); give a smaller --batch-size or more text")
    for p in cfg.val_data if cfg.val_data is not None else _default_val(cfg.data):
        s = val_streams[f"val/{_name(p)}"] = torch.from_numpy(token_stream(p, tokenizer))
        if len(s) < cfg.seq_len + 1:  # found now, not at the first evaluation
            raise LongMemError(f"validation set {p} has {len(s)} tokens, fewer than one window of {cfg.seq_len + 1}; "
                               "give more text or a smaller --seq-len")
    return train_streams, val_streams


def resume(run: PretrainRun, device: torch.device) -> None:
    """Model, optimizer, schedule, RNGs and counters from the checkpoint; the metrics logged after it dropped."""
    state = torch.load(run.checkpoint_path, weights_only=False, map_location=device)
    diff = [k for k in _SHAPE_FIELDS if state["config"][k] != getattr(run.cfg, k)]
    if diff:
        raise LongMemError(f"the checkpoint in {run.out} has a different {', '.join(diff)}; "
                           "resume with the same shape flags or use another --out")
    run.model.load_state_dict(state["model"])
    run.optim.optimizer.load_state_dict(state["optimizer"])
    run.optim.scheduler.load_state_dict(state["scheduler"])
    run.gen.set_state(state["sampler_rng"])
    set_rng_state(state.get("rng", state.get("torch_rng")), device)  # "torch_rng": checkpoints before rng_state
    run.step, run.tokens_seen, run.train_seconds = state["step"], state["tokens_seen"], state["seconds"]
    if run.metrics_path.exists():  # drop what the killed run logged after its checkpoint
        with open(run.metrics_path) as f:
            run.records = [r for r in map(json.loads, f) if r["step"] <= run.step]


def log(run: PretrainRun, record: dict) -> None:
    run.records.append(record)
    with open(run.metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")


def checkpoint(run: PretrainRun) -> None:
    save_checkpoint(run.checkpoint_path, {
        "model": run.model.state_dict(), "optimizer": run.optim.optimizer.state_dict(),
        "scheduler": run.optim.scheduler.state_dict(), "sampler_rng": run.gen.get_state(),
        "rng": rng_state(next(run.model.parameters()).device), "step": run.step, "tokens_seen": run.tokens_seen,
        "seconds": run.train_seconds, "config": asdict(run.cfg),
    })


def validate(run: PretrainRun) -> dict:
    cfg = run.cfg
    return {k: round(evaluate(run.model, s, cfg.seq_len, cfg.eval_tokens, cfg.batch_size, cfg.precision)[0], 4)
            for k, s in run.val_streams.items()}


def finish(run: PretrainRun, stop_reason: str) -> dict:
    """The final record (with validation), a last checkpoint, the exported model and the loss plot."""
    final = {"step": run.step, "stopped": stop_reason, "tokens": run.tokens_seen, "seconds": round(run.train_seconds, 1)}
    if run.val_streams:
        final.update(validate(run))
    log(run, final)
    checkpoint(run)
    save_model(run.model, run.tokenizer, run.out)
    plot_losses(run.records, run.out / "loss.png")
    return final


def export_backbone(run_dir: str | os.PathLike, dest: str | os.PathLike) -> dict:
    """Write the latest state of a (finished, stopped or still running) run as a clean model folder.

    Takes the weights of ``RUN/checkpoint/state.pt`` (the final state once a run has ended; the
    last checkpoint while it runs), so no optimizer state, checkpoint or temporary file is
    copied. ``dest`` gets config + safetensors + tokenizer, and ``pretrain-metrics.jsonl`` /
    ``pretrain-loss.png`` from the run. Returns ``{"step", "tokens", "seconds"}`` of the state.
    """
    run, dest = Path(run_dir), Path(dest)
    ckpt_path = run / "checkpoint" / "state.pt"
    if not ckpt_path.is_file():
        raise LongMemError(f"{ckpt_path} does not exist; give the --out folder of a "
                           "`longmem pretrain` run that saved a checkpoint")
    fieldnames = {f.name for f in fields(PretrainConfig)}
    try:
        state = torch.load(ckpt_path, weights_only=False, map_location="cpu")
        cfg = PretrainConfig(**{k: v for k, v in state["config"].items() if k in fieldnames})
    except LongMemError:
        raise
    except Exception as e:  # truncated, empty, or not a checkpoint of `longmem pretrain`: all the same to the user
        raise LongMemError(f"{ckpt_path} is damaged ({type(e).__name__}); resume the run to write a new one, "
                           "or export another run") from None
    # the run folder holds its tokenizer once the run has ended; before, the one it was given
    has_tok = (run / "tokenizer_config.json").is_file()
    tokenizer = load_tokenizer(str(run) if has_tok else cfg.tokenizer)
    model = build_model(cfg, tokenizer)
    model.load_state_dict(state["model"])
    dest.mkdir(parents=True, exist_ok=True)
    save_model(model, tokenizer, dest)
    for src, name in (("metrics.jsonl", "pretrain-metrics.jsonl"), ("loss.png", "pretrain-loss.png")):
        if (run / src).is_file():
            atomic_write(dest / name, lambda tmp, src=src: shutil.copyfile(run / src, tmp))
    return {"step": state["step"], "tokens": state["tokens_seen"], "seconds": state["seconds"]}


# --------------------------------------------------------------------------- perplexity


def perplexity(model_dir: str, paths: list[str], seq_len: int = 512,
               max_tokens: int | None = None, precision: str = "fp32") -> dict[str, dict]:
    """Per-token loss and perplexity of the causal LM in ``model_dir`` on each of ``paths``."""
    if seq_len < 1:
        raise LongMemError(f"--seq-len must be at least 1, got {seq_len}")
    if not Path(model_dir).is_dir():
        raise LongMemError(f"model folder {model_dir} does not exist; give a folder written by `longmem pretrain` "
                           "or `longmem export-backbone`")
    torch.set_num_threads(os.cpu_count() or 1)
    tokenizer = load_tokenizer(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    except Exception as e:
        raise LongMemError(f"could not load a causal LM from {model_dir} ({type(e).__name__}); "
                           "give a folder written by `longmem pretrain`") from None
    results = {}
    for p in paths:
        loss, n = evaluate(model, torch.from_numpy(token_stream(p, tokenizer)), seq_len,
                           max_tokens, precision=precision)
        results[_name(p)] = {"loss": round(loss, 4), "ppl": round(math.exp(loss), 2), "tokens": n}
    return results
