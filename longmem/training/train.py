"""Memory-augmented adaptation (paper s3.4): train the SideNet, never the backbone.

The loop is written out in ``train`` (no framework). Each batch row streams one document; the row's
memory is reset when its document changes. Under ``torchrun`` every rank owns its rows and memories
and DistributedDataParallel averages the SideNet's gradients (gloo on CPU, nccl on GPU).

Resuming is exact: the checkpoint holds the SideNet, optimizer, schedule, RNG and stream positions.
Memories are not saved: because the backbone is frozen, a row's memory is a pure function of the
segments it has read, so it is rebuilt by replaying them through the backbone.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer

from longmem.backbone import parse_dtype
from longmem.baselines import BASELINES
from longmem.config import LongMemConfig
from longmem.data.streams import IGNORE, DocumentStreams, encode_documents, num_segments
from longmem.errors import LongMemError
from longmem.eval.perplexity import stream_nll
from longmem.eval.staleness import staleness
from longmem.io import file_sha256
from longmem.loading import load_tokenizer
from longmem.model import LongMem

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "models" / "longmem-tiny"


@dataclass
class TrainConfig:
    backbone: str = str(DEFAULT_MODEL / "backbone")
    data: list = field(default_factory=list)  # training documents (files, folders, .jsonl, hf:NAME)
    val_data: list = field(default_factory=list)  # validation documents (periodic loss with/without memory)
    out: str = "runs/longmem"
    tokenizer: str | None = None  # default: the backbone's folder
    max_steps: int = 1000
    max_minutes: float | None = None  # stop cleanly (and checkpoint) after this wall time
    batch_size: int = 8  # rows (document streams) per process
    grad_accum: int = 1
    segment_length: int | None = None  # T; default: the model's (min(1024, backbone context))
    memory_size: int = 65536
    chunk_size: int = 4
    topk_chunks: int = 16
    memory_layer: int | None = None
    lr: float = 2e-4  # paper: 2e-4, linear decay to 0
    betas: tuple = (0.9, 0.98)  # paper: Adam(0.9, 0.98, eps 1e-6), weight decay 0.01
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | bf16 | fp16 | fp32 (autocast; weights stay fp32)
    dtype: str = "fp32"  # the weights' type (backbone and SideNet): bf16 halves a real backbone's memory
    eval_every: int = 100
    eval_docs: int = 4  # validation documents per evaluation
    eval_segments: int = 8  # segments read per validation document (the first ones)
    save_every: int = 100
    seed: int = 0
    progress: bool = True
    method: str = "longmem"  # longmem | memtrm (coupled memory, backbone trains) | finetune (no memory)
    train_layers: str = "all"  # baselines: train all backbone blocks or the upper half
    staleness_every: int = 0  # measure stored-vs-fresh key similarity every N steps (0: never)
    retrieval_metric: str | None = None  # chunk search score: ip (the paper; default) or cosine (see LongMemConfig)
    retrieval_query: str | None = None  # what searches the memory: query (the paper; default) or key (see LongMemConfig)
    retrieval_next: bool | None = None  # also attend to the chunk after each retrieved one (see LongMemConfig)
    init_from: str | None = None  # longmem: start the SideNet (and memory settings) from this saved LongMem model

    def __post_init__(self):
        if self.max_steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise LongMemError(f"max_steps, batch_size and grad_accum must be positive (got {self.max_steps}, {self.batch_size}, {self.grad_accum})")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise LongMemError(f"precision must be auto, bf16, fp16 or fp32, got {self.precision!r}")
        if self.dtype not in ("bf16", "fp16", "fp32"):
            raise LongMemError(f"dtype must be bf16, fp16 or fp32, got {self.dtype!r}")
        if not self.data:
            raise LongMemError("no training data: pass --data FILE|DIR|JSONL (see `longmem data`)")
        if self.init_from is not None and self.method != "longmem":
            raise LongMemError("--init-from starts a LongMem SideNet; it cannot be combined with --method " + self.method)
        if self.retrieval_next and self.method != "longmem":
            raise LongMemError(f"--retrieval-next is a LongMem SideNet option; --method {self.method} does not use it")
        if self.retrieval_query not in (None, "query") and self.method != "longmem":
            raise LongMemError(f"--retrieval-query {self.retrieval_query} is a LongMem SideNet option; --method {self.method} searches with its query")
        if self.method not in ("longmem", "memtrm", "finetune"):
            raise LongMemError(f"method must be longmem, memtrm or finetune, got {self.method!r}")
        self.betas = tuple(self.betas)


def resolve_tokenizer(ref: str):
    """A tokenizer from a local folder or a hub id (the backbone's, usually)."""
    if Path(ref).is_dir():
        return load_tokenizer(ref)
    try:
        return AutoTokenizer.from_pretrained(ref)
    except (OSError, ValueError) as e:
        raise LongMemError(
            f"cannot load backbone or tokenizer {ref!r}: not a local folder, and the hub is unreachable or has no "
            f"such model ({type(e).__name__}); pass a folder saved with save_pretrained"
        ) from None


# -- distributed -----------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int, torch.device]:
    """(rank, world_size, device); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else None  # bf16 without hardware support is slower than fp32


def _cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then linear decay to 0 at ``total`` (the paper's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)


# -- checkpoints -----------------------------------------------------------------------------------


def save_checkpoint(out: Path, model, trainer_state: dict, tokenizer=None) -> None:
    """Write OUT/checkpoint atomically: a new folder is completed, then swapped in."""
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, tokenizer=tokenizer)
    torch.save(trainer_state, tmp / "trainer.pt")
    with open(tmp / "COMPLETE", "w") as f:  # written last: its presence marks a whole checkpoint
        f.write(json.dumps({"format": "longmem-train-checkpoint", "version": 1,
                            "trainer_sha256": file_sha256(tmp / "trainer.pt")}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(ckpt: Path) -> dict:
    """OUT/checkpoint/trainer.pt after checking it against the checksum in COMPLETE (written by this library)."""
    marker = (ckpt / "COMPLETE").read_text().strip()
    if marker != "ok":  # checkpoints from before the checksum say just "ok"
        try:
            want = json.loads(marker)["trainer_sha256"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise LongMemError(f"{ckpt}/COMPLETE is damaged, so the checkpoint cannot be trusted; start over with another --out") from None
        if not (ckpt / "trainer.pt").is_file() or file_sha256(ckpt / "trainer.pt") != want:
            raise LongMemError(f"{ckpt}/trainer.pt is damaged (checksum mismatch); it cannot be resumed: start over with another --out")
    return torch.load(ckpt / "trainer.pt", weights_only=False)  # our own file, verified above


def find_checkpoint(out: Path) -> Path | None:
    for cand in (out / "checkpoint", out / "checkpoint.old"):  # .old survives a kill mid-swap
        if (cand / "COMPLETE").is_file():
            return cand
    return None


# -- the loop --------------------------------------------------------------------------------------


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run memory-augmented adaptation; returns the final metrics. Writes OUT/{longmem.json,
    sidenet.safetensors, metrics.jsonl, loss.png, checkpoint/}."""
    rank, world, device = init_distributed()
    torch.manual_seed(cfg.seed + rank)
    out = Path(cfg.out)
    ckpt = find_checkpoint(out) if resume else None
    if resume and ckpt is None and rank == 0:
        print(f"no checkpoint in {out}; starting from scratch")
    if not resume and find_checkpoint(out) is not None:
        raise LongMemError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")

    tokenizer = resolve_tokenizer(cfg.tokenizer or cfg.backbone)
    docs = encode_documents(cfg.data, tokenizer, progress=cfg.progress and rank == 0)  # bad data fails fast
    lm_cfg = LongMemConfig(memory_layer=cfg.memory_layer, chunk_size=cfg.chunk_size, memory_size=cfg.memory_size,
                           retrieval_metric=cfg.retrieval_metric or "ip", retrieval_query=cfg.retrieval_query or "query",
                           retrieval_next=bool(cfg.retrieval_next), topk_chunks=cfg.topk_chunks, segment_length=cfg.segment_length)
    if cfg.method == "longmem" and ckpt:
        model = LongMem.from_pretrained(ckpt, backbone=cfg.backbone, dtype=cfg.dtype)
    elif cfg.method == "longmem" and cfg.init_from:
        overrides = {k: getattr(cfg, k) for k in ("retrieval_metric", "retrieval_query", "retrieval_next")
                     if getattr(cfg, k) is not None}
        model = LongMem.from_pretrained(cfg.init_from, backbone=cfg.backbone, dtype=cfg.dtype, **overrides)
    elif cfg.method == "longmem":
        model = LongMem.from_backbone(cfg.backbone, lm_cfg, dtype=cfg.dtype)
    else:
        cls = BASELINES[cfg.method]
        model = cls.from_pretrained(ckpt).to(parse_dtype(cfg.dtype)) if ckpt else cls.from_backbone(cfg.backbone, lm_cfg, cfg.train_layers, cfg.dtype)
    model.to(device).train()
    T = model.segment_length
    bb = model.backbone
    context = bb.max_positions  # sliding-window layers apply their own window inside attention
    if T > context:
        raise LongMemError(f"--segment-length {T} is longer than the backbone's context ({context}); give at most {context}")
    if len(tokenizer) > model.backbone.vocab_size:
        raise LongMemError(f"tokenizer has {len(tokenizer)} tokens but the backbone only {model.backbone.vocab_size}; use the backbone's own tokenizer")
    if sum(len(d) for d in docs) <= T:
        raise LongMemError(f"the training data has {sum(len(d) for d in docs)} tokens, less than one segment ({T}); give more text or a smaller --segment-length")
    segments = sum(num_segments(len(d), T) for d in docs)
    if cfg.batch_size * world > segments:  # more rows would only repeat the same segments (and an enormous count hang)
        raise LongMemError(f"--batch-size {cfg.batch_size} x {world} process(es) is more rows than the training data has segments "
                           f"({segments} of {T} tokens); give a smaller --batch-size or more text")
    val_docs = encode_documents(cfg.val_data, tokenizer)[: cfg.eval_docs] if cfg.val_data else []
    val_docs = [d[: cfg.eval_segments * T + 1] for d in val_docs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    streams = DocumentStreams(docs, cfg.batch_size, T, loop=True, seed=cfg.seed, rank=rank, world_size=world, pad_id=pad)
    amp = autocast_dtype(cfg.precision, device)
    memory = model.new_memory(cfg.batch_size, dtype=amp)  # stored in the compute dtype: no per-step casts

    params = model.trainable_parameters()
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]  # norms, biases, the gate
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg.warmup_steps, cfg.max_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    step, tokens_seen, elapsed_before = 0, 0, 0.0

    if ckpt is not None:
        state = load_trainer_state(ckpt)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        step, tokens_seen, elapsed_before = state["step"], state["tokens"], state["elapsed"]
        streams.load_state_dict(state["streams"][rank])
        torch.set_rng_state(state["rng"][rank])
        _rebuild_memory(model, streams, memory, device, amp)
        if rank == 0:
            print(f"resumed from {ckpt} at step {step}")

    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if ckpt is None and rank == 0:
        metrics_path.write_text("")
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2, default=str) + "\n")

    def log(record):
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint():
        rngs = [None] * world
        stream_states = [None] * world
        mine = (torch.get_rng_state(), streams.state_dict())
        if world > 1:
            gathered = [None] * world
            torch.distributed.all_gather_object(gathered, mine)
            rngs, stream_states = [g[0] for g in gathered], [g[1] for g in gathered]
        else:
            rngs, stream_states = [mine[0]], [mine[1]]
        if rank == 0:
            save_checkpoint(out, model, {"optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                         "scaler": scaler.state_dict(), "step": step, "tokens": tokens_seen,
                                         "elapsed": elapsed_before + time.time() - t0, "streams": stream_states, "rng": rngs},
                            tokenizer=tokenizer)
            log({"step": step, "checkpoint": "saved"})  # written after the swap: a step reported here is never lost
        if world > 1:
            torch.distributed.barrier()

    def validate():
        if not val_docs or rank != 0:
            return {}
        kw = dict(segment_length=T, batch_size=min(len(val_docs), cfg.batch_size), autocast=amp)
        res = {}
        for mode in ("longmem", "no_memory"):
            s = stream_nll(model, val_docs, mode, **kw).summary()
            res[f"val_loss_{mode}"] = s["loss"]
            res[f"val_loss_beyond_{mode}"] = math.log(s["ppl_beyond_window"]) if s["ppl_beyond_window"] else None
        model.train()
        return res

    t0 = time.time()
    bar = tqdm(total=cfg.max_steps, initial=step, desc="train", unit="step", disable=not (cfg.progress and rank == 0))
    last = {}
    stop_reason = "max_steps"
    window_tokens, window_t = 0, time.time()
    while step < cfg.max_steps:
        loss_sum = 0.0
        for micro in range(cfg.grad_accum):
            batch = streams.next_batch()
            if batch.reset:
                memory.reset(batch.reset)
            ids, targets = batch.input_ids.to(device), batch.targets.to(device)
            sync = micro == cfg.grad_accum - 1 or world == 1
            ctx = ddp.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
            with ctx:
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    logits = ddp(ids, memory=memory).logits
                loss = next_token_loss(logits, targets)
                scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
            n = int((targets != IGNORE).sum()) * world
            tokens_seen += n
            window_tokens += n
        if not math.isfinite(loss_sum):
            stop_reason = "non-finite loss"
            raise LongMemError(f"loss became {loss_sum} at step {step}; the last good checkpoint is kept in {out}/checkpoint. Lower --lr or use --precision fp32")
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        now = time.time()
        tps = window_tokens / max(1e-9, now - window_t)
        window_tokens, window_t = 0, now
        last = {"step": step, "loss": loss_sum, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                "tokens": tokens_seen, "tok_per_s": round(tps, 1), "elapsed_s": round(elapsed_before + now - t0, 1),
                "gate": [round(float(g), 4) for g in torch.sigmoid(_gate(model).detach())]}
        log(last)
        bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tps:.0f}")
        bar.update(1)
        if cfg.staleness_every and step % cfg.staleness_every == 0 and rank == 0 and cfg.method != "finetune":
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                log({"step": step, "staleness": staleness(model, memory, streams.replay_segments(0)[-32:])})
        if cfg.eval_every and step % cfg.eval_every == 0:
            v = validate()
            if v:
                log({"step": step, **v})
                last.update(v)
        out_of_time = cfg.max_minutes is not None and (time.time() - t0) / 60 >= cfg.max_minutes
        if world > 1:
            flag = torch.tensor([float(out_of_time)])
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        if step % cfg.save_every == 0 or step == cfg.max_steps or out_of_time:
            checkpoint()
        if out_of_time:
            stop_reason = "max_minutes"
            break
    bar.close()
    if rank == 0:
        final = validate()
        if final:
            log({"step": step, **final})
            last.update(final)
        model.save_pretrained(out, tokenizer=tokenizer)
        plot_metrics(metrics_path, out / "loss.png")
        last["stop_reason"] = stop_reason
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return last


def _gate(model):
    return model.sidenet.gate if hasattr(model, "sidenet") else model.gate


@torch.no_grad()
def _rebuild_memory(model, streams: DocumentStreams, memory, device, amp) -> None:
    """Refill each row's memory with the segments it already read of its current document."""
    for b in range(streams.B):
        for seg in streams.replay_segments(b):
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                kv = model.backbone(seg.to(device), model.memory_layer)
            memory.add(kv.keys, kv.values, rows=[b])


def plot_metrics(metrics_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train_rows:
        steps = [r["step"] for r in train_rows]
        losses = [r["loss"] for r in train_rows]
        k = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        ax.plot(steps, losses, alpha=0.25, color="C0")
        ax.plot(steps, smooth, color="C0", label="train loss")
    for key, color, label in (("val_loss_longmem", "C1", "val loss, with memory"), ("val_loss_no_memory", "C2", "val loss, no memory")):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), "o-", color=color, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("LongMem memory-augmented adaptation")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
