"""Memory-augmented adaptation (paper s3.4 / LONGMEM.md s5): train the SideNet, never the backbone.

The loop is written out in ``train`` (no framework). Each batch row streams one document; the row's
memory is reset when its document changes. Under ``torchrun`` every rank owns its rows and memories
and DistributedDataParallel averages the SideNet's gradients (gloo on CPU, nccl on GPU).

Resuming is exact: the checkpoint holds the SideNet, optimizer, schedule, RNG and stream positions.
Memories are not saved: because the backbone is frozen, a row's memory is a pure function of the
segments it has read, so it is rebuilt by replaying them through the backbone.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from longmem.baselines import BASELINES
from longmem.config import LongMemConfig
from longmem.data.streams import DocumentStreams, encode_documents, num_segments
from longmem.errors import LongMemError
from longmem.eval.perplexity import stream_nll
from longmem.eval.staleness import staleness
from longmem.io import file_sha256
from longmem.loading import DEFAULT_MODEL, resolve_tokenizer
from longmem.model import LongMem
from longmem.training.step import Optimization, adamw, schedule, train_step


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


@dataclass
class Run:
    """The state of one training process: what it trains, on what, and how far it got."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    tokenizer: object
    model: torch.nn.Module  # LongMem or a baseline
    net: torch.nn.Module  # what the step calls: the model or its DDP wrapper
    streams: DocumentStreams
    memory: object  # MemoryBank, one row per stream of this process
    optim: Optimization
    val_docs: list
    step: int = 0
    tokens: int = 0
    elapsed_before: float = 0.0  # seconds spent by the runs this one resumes
    t0: float = field(default_factory=time.time)

    def log(self, record: dict) -> None:
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run memory-augmented adaptation; returns the final metrics. Writes OUT/{longmem.json,
    sidenet.safetensors, metrics.jsonl, loss.png, checkpoint/}."""
    run, ckpt = set_up(cfg, resume)
    if ckpt is not None:
        resume_from(run, ckpt)
    start_outputs(run, fresh=ckpt is None)
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train", unit="step", disable=not (cfg.progress and run.rank == 0))
    stop_reason, last, window_t = "max_steps", {}, time.time()
    while run.step < cfg.max_steps:
        stats = train_step(run.net, [run.streams.next_batch() for _ in range(cfg.grad_accum)], run.optim, memory=run.memory)
        if not stats.finite:
            raise LongMemError(f"loss became {stats.loss} at step {run.step}; the last good checkpoint is kept in "
                               f"{run.out}/checkpoint. Lower --lr or use --precision fp32")
        run.step += 1
        run.tokens += stats.tokens * run.world
        now = time.time()
        last = {"step": run.step, "loss": stats.loss, "lr": run.optim.scheduler.get_last_lr()[0], "grad_norm": stats.grad_norm,
                "tokens": run.tokens, "tok_per_s": round(stats.tokens * run.world / max(1e-9, now - window_t), 1),
                "elapsed_s": round(run.elapsed_before + now - run.t0, 1), "gate": gate_values(run.model)}
        window_t = now
        run.log(last)
        bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{last['tok_per_s']:.0f}")
        bar.update(1)
        if cfg.staleness_every and run.step % cfg.staleness_every == 0 and cfg.method != "finetune":
            measure_staleness(run)
        if cfg.eval_every and run.step % cfg.eval_every == 0:
            last.update(validate(run))
        out_of_time = over_time_limit(run)
        if run.step % cfg.save_every == 0 or run.step == cfg.max_steps or out_of_time:
            checkpoint(run)
        if out_of_time:
            stop_reason = "max_minutes"
            break
    bar.close()
    return finish(run, last, stop_reason)


# -- set-up ----------------------------------------------------------------------------------------


def set_up(cfg: TrainConfig, resume: bool) -> tuple[Run, Path | None]:
    """Process group, data, model (by method, or from the checkpoint), memory and optimizer."""
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
    model = build_model(cfg, ckpt).to(device).train()
    T = check_data(cfg, model, tokenizer, docs, world)
    val_docs = encode_documents(cfg.val_data, tokenizer)[: cfg.eval_docs] if cfg.val_data else []
    val_docs = [d[: cfg.eval_segments * T + 1] for d in val_docs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    streams = DocumentStreams(docs, cfg.batch_size, T, loop=True, seed=cfg.seed, rank=rank, world_size=world, pad_id=pad)
    amp = autocast_dtype(cfg.precision, device)
    memory = model.new_memory(cfg.batch_size, dtype=amp)  # stored in the compute dtype: no per-step casts
    net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if world > 1 else model
    optim = make_optimization(cfg, model.trainable_parameters(), amp)
    return Run(cfg, rank, world, device, out, tokenizer, model, net, streams, memory, optim, val_docs), ckpt


def build_model(cfg: TrainConfig, ckpt: Path | None):
    """The model of ``cfg.method``: from the checkpoint when resuming, else fresh (or ``--init-from``)."""
    if cfg.method != "longmem":
        cls = BASELINES[cfg.method]
        return cls.from_pretrained(ckpt) if ckpt else cls.from_backbone(cfg.backbone, memory_config(cfg), cfg.train_layers)
    if ckpt:
        return LongMem.from_pretrained(ckpt, backbone=cfg.backbone)
    if cfg.init_from:
        overrides = {k: getattr(cfg, k) for k in ("retrieval_metric", "retrieval_query", "retrieval_next")
                     if getattr(cfg, k) is not None}
        return LongMem.from_pretrained(cfg.init_from, backbone=cfg.backbone, **overrides)
    return LongMem.from_backbone(cfg.backbone, memory_config(cfg))


def memory_config(cfg: TrainConfig) -> LongMemConfig:
    return LongMemConfig(memory_layer=cfg.memory_layer, chunk_size=cfg.chunk_size, memory_size=cfg.memory_size,
                         retrieval_metric=cfg.retrieval_metric or "ip", retrieval_query=cfg.retrieval_query or "query",
                         retrieval_next=bool(cfg.retrieval_next), topk_chunks=cfg.topk_chunks, segment_length=cfg.segment_length)


def check_data(cfg: TrainConfig, model, tokenizer, docs, world: int) -> int:
    """The segment length T, once the data, tokenizer and rows fit the model."""
    T = model.segment_length
    bb = model.backbone
    context = min([bb.max_positions] + ([bb.sliding_window] if bb.sliding_window else []))
    if T > context:
        raise LongMemError(f"--segment-length {T} is longer than the backbone's context ({context}); give at most {context}")
    if len(tokenizer) > bb.vocab_size:
        raise LongMemError(f"tokenizer has {len(tokenizer)} tokens but the backbone only {bb.vocab_size}; use the backbone's own tokenizer")
    if sum(len(d) for d in docs) <= T:
        raise LongMemError(f"the training data has {sum(len(d) for d in docs)} tokens, less than one segment ({T}); give more text or a smaller --segment-length")
    segments = sum(num_segments(len(d), T) for d in docs)
    if cfg.batch_size * world > segments:  # more rows would only repeat the same segments (and an enormous count hang)
        raise LongMemError(f"--batch-size {cfg.batch_size} x {world} process(es) is more rows than the training data has segments "
                           f"({segments} of {T} tokens); give a smaller --batch-size or more text")
    return T


def make_optimization(cfg: TrainConfig, params: list, amp: torch.dtype | None) -> Optimization:
    """AdamW (no decay on 1-D parameters), linear warmup then linear decay to 0, clipping, a scaler for fp16."""
    opt = adamw(params, cfg.lr, cfg.betas, cfg.eps, cfg.weight_decay)
    sched = schedule(opt, warmup=cfg.warmup_steps, total=cfg.max_steps, decay="linear", final=0.0)
    scaler = torch.amp.GradScaler(params[0].device.type, enabled=amp == torch.float16)
    return Optimization(opt, sched, scaler, params, cfg.grad_clip, amp)


def start_outputs(run: Run, fresh: bool) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    if fresh and run.rank == 0:
        (run.out / "metrics.jsonl").write_text("")
        (run.out / "train_config.json").write_text(json.dumps(asdict(run.cfg), indent=2, default=str) + "\n")


# -- resume and checkpoints ------------------------------------------------------------------------


def resume_from(run: Run, ckpt: Path) -> None:
    """Optimizer, schedule, scaler, counters, stream positions and RNG from the checkpoint; memories rebuilt."""
    state = load_trainer_state(ckpt)
    run.optim.optimizer.load_state_dict(state["optimizer"])
    run.optim.load_state_dict(state)
    run.step, run.tokens, run.elapsed_before = state["step"], state["tokens"], state["elapsed"]
    run.streams.load_state_dict(state["streams"][run.rank])
    torch.set_rng_state(state["rng"][run.rank])
    rebuild_memory(run)
    if run.rank == 0:
        print(f"resumed from {ckpt} at step {run.step}")


def checkpoint(run: Run) -> None:
    """Every process's RNG and stream positions, the model and optimizer, written by rank 0 atomically."""
    mine = (torch.get_rng_state(), run.streams.state_dict())
    gathered = [mine]
    if run.world > 1:
        gathered = [None] * run.world
        torch.distributed.all_gather_object(gathered, mine)
    if run.rank == 0:
        save_checkpoint(run.out, run.model, {"optimizer": run.optim.optimizer.state_dict(), **run.optim.state_dict(),
                                             "step": run.step, "tokens": run.tokens,
                                             "elapsed": run.elapsed_before + time.time() - run.t0,
                                             "streams": [g[1] for g in gathered], "rng": [g[0] for g in gathered]},
                        tokenizer=run.tokenizer)
        run.log({"step": run.step, "checkpoint": "saved"})  # written after the swap: a step reported here is never lost
    if run.world > 1:
        torch.distributed.barrier()


@torch.no_grad()
def rebuild_memory(run: Run) -> None:
    """Refill each row's memory with the segments it already read of its current document."""
    amp = run.optim.autocast
    for b in range(run.streams.B):
        segments = run.streams.replay_segments(b)
        if segments:
            with torch.autocast(run.device.type, dtype=amp, enabled=amp is not None):
                run.model.write_memory(torch.cat(segments, dim=1), run.memory, rows=[b])


# -- measurements ----------------------------------------------------------------------------------


def validate(run: Run) -> dict:
    """Validation loss with and without memory (rank 0), logged; {} without validation data."""
    if not run.val_docs or run.rank != 0:
        return {}
    kw = dict(segment_length=run.model.segment_length, batch_size=min(len(run.val_docs), run.cfg.batch_size),
              autocast=run.optim.autocast)
    res = {}
    for mode in ("longmem", "no_memory"):
        s = stream_nll(run.model, run.val_docs, mode, **kw).summary()
        res[f"val_loss_{mode}"] = s["loss"]
        res[f"val_loss_beyond_{mode}"] = math.log(s["ppl_beyond_window"]) if s["ppl_beyond_window"] else None
    run.model.train()
    run.log({"step": run.step, **res})
    return res


def measure_staleness(run: Run) -> None:
    """Rank 0: how far row 0's stored keys are from what the current weights compute."""
    if run.rank != 0:
        return
    amp = run.optim.autocast
    with torch.autocast(run.device.type, dtype=amp, enabled=amp is not None):
        run.log({"step": run.step, "staleness": staleness(run.model, run.memory, run.streams.replay_segments(0)[-32:])})


def over_time_limit(run: Run) -> bool:
    """--max-minutes reached (on any process: all stop together)."""
    out_of_time = run.cfg.max_minutes is not None and (time.time() - run.t0) / 60 >= run.cfg.max_minutes
    if run.world > 1:
        flag = torch.tensor([float(out_of_time)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        out_of_time = bool(flag.item())
    return out_of_time


def gate_values(model) -> list[float]:
    gate = model.sidenet.gate if hasattr(model, "sidenet") else model.gate
    return [round(float(g), 4) for g in torch.sigmoid(gate.detach())]


def finish(run: Run, last: dict, stop_reason: str) -> dict:
    """Final validation, the trained model in OUT, the loss plot; the process group closed."""
    if run.rank == 0:
        last.update(validate(run))
        run.model.save_pretrained(run.out, tokenizer=run.tokenizer)
        plot_metrics(run.out / "metrics.jsonl", run.out / "loss.png")
        last["stop_reason"] = stop_reason
    if run.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return last


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
