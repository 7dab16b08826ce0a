"""Memory-augmented adaptation (paper s3.4): train the SideNet, never the backbone.

The loop is written out in ``train`` (no framework); one optimizer step is ``training.step.train_step``.
Each batch row streams one document; the row's memory is reset when its document changes. Under
``torchrun`` every rank owns its rows and memories; DistributedDataParallel averages the SideNet's
gradients, or FSDP2 shards it (``--strategy fsdp``, see ``training.scale``; gloo on CPU, nccl on GPU).

Resuming is exact, for every method: the checkpoint holds the SideNet (or the trained backbone),
optimizer (by parameter name, so either strategy resumes it), schedule, CPU and device RNG and stream
positions of every process. LongMem's memories are not saved: because the backbone is frozen, a row's
memory is a pure function of the segments it has read, so it is rebuilt by replaying them through the
backbone. MemTRM's memory holds keys of the backbone it trains, each written by the weights of its
step, so the checkpoint stores it (``keeps_memory``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from longmem.backbone import load_causal_lm
from longmem.baselines import BASELINES
from longmem.data.streams import DocumentStreams, encode_documents, num_segments
from longmem.errors import LongMemError
from longmem.plots import plot_loss_curves
from longmem.io import atomic_write, file_sha256, fsync_path, fsync_tree
from longmem.loading import resolve_tokenizer
from longmem.memory import MemoryBank
from longmem.model import LongMem
from longmem.staleness import staleness
from longmem.stream_loss import stream_nll
from longmem.training.config import OptimConfig, TrainConfig
from longmem.training.scale import (
    OPTIMIZER_FORMAT,
    add_lora,
    full_state,
    full_tensor,
    init_distributed,
    load_optimizer_state,
    lora_layers,
    merge_lora,
    optimizer_state,
    shard,
)
from longmem.training.step import Optimization, adamw, rng_state, schedule, set_rng_state, train_step


# -- distributed -----------------------------------------------------------------------------------


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


def save_checkpoint(out: Path, model, trainer_state: dict, tokenizer=None, weights: dict | None = None) -> None:
    """Write OUT/checkpoint atomically: a new folder is completed, then swapped in. ``weights``: the SideNet's
    (gathered, merged) instead of its own state_dict."""
    final, tmp, old = out / "checkpoint", out / "checkpoint.tmp", out / "checkpoint.old"
    shutil.rmtree(tmp, ignore_errors=True)
    if weights is None:
        model.save_pretrained(tmp, tokenizer=tokenizer)
    else:
        model.save_pretrained(tmp, tokenizer=tokenizer, state=weights)
    torch.save(trainer_state, tmp / "trainer.pt")
    fsync_tree(tmp)  # every file (weights, tokenizer, trainer state) on disk before the marker says it is whole
    with open(tmp / "COMPLETE", "w") as f:  # written last: its presence marks a whole checkpoint
        f.write(json.dumps({"format": "longmem-train-checkpoint", "version": 1,
                            "trainer_sha256": file_sha256(tmp / "trainer.pt")}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    fsync_path(tmp)
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(out)  # the swap is durable
    shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(ckpt: Path) -> dict:
    """OUT/checkpoint/trainer.pt after checking it against the checksum in COMPLETE (written by this library)."""
    try:
        want = json.loads((ckpt / "COMPLETE").read_text())["trainer_sha256"]
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
    model: torch.nn.Module  # LongMem or a baseline (sharded in place under FSDP)
    streams: DocumentStreams
    memory: object  # MemoryBank, one row per stream of this process
    amp: torch.dtype | None  # autocast dtype
    val_docs: list
    net: torch.nn.Module | None = None  # what the step calls: the model or its DDP wrapper (see ``distribute``)
    optim: Optimization | None = None
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
    run, state = set_up(cfg, resume)
    if state is not None:
        resume_streams(run, state)
    distribute(run)
    if state is not None:
        resume_optimizer(run, state)
    start_outputs(run, fresh=state is None)
    bar = tqdm(total=cfg.schedule.max_steps, initial=run.step, desc="train", unit="step", disable=not (cfg.progress and run.rank == 0))
    stop_reason, last, window_t = "max_steps", {}, time.time()
    while run.step < cfg.schedule.max_steps:
        stats = train_step(run.net, [run.streams.next_batch() for _ in range(cfg.optim.grad_accum)], run.optim, memory=run.memory)
        if not all_ranks(stats.finite, run):  # every process stops at the same step
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
        if cfg.schedule.staleness_every and run.step % cfg.schedule.staleness_every == 0 and cfg.method != "finetune":
            measure_staleness(run)
        if cfg.schedule.eval_every and run.step % cfg.schedule.eval_every == 0:
            last.update(validate(run))
        out_of_time = over_time_limit(run)
        if run.step % cfg.schedule.save_every == 0 or run.step == cfg.schedule.max_steps or out_of_time:
            checkpoint(run)
        if out_of_time:
            stop_reason = "max_minutes"
            break
    bar.close()
    return finish(run, last, stop_reason)


# -- set-up ----------------------------------------------------------------------------------------


def set_up(cfg: TrainConfig, resume: bool) -> tuple[Run, dict | None]:
    """Process group, data, model (by method, or from the checkpoint) and memory; the checkpoint's trainer
    state when resuming (else None). Not yet distributed (see ``distribute``)."""
    rank, world, device = init_distributed()
    torch.manual_seed(cfg.seed + rank)
    if cfg.scale.strategy == "fsdp" and world < 2:
        raise LongMemError("--strategy fsdp shards across processes but this is one; launch with torchrun "
                           "--nproc_per_node N (N >= 2), or train in one process with the default --strategy ddp")
    out = Path(cfg.out)
    ckpt = find_checkpoint(out) if resume else None
    if resume and ckpt is None and rank == 0:
        print(f"no checkpoint in {out}; starting from scratch")
    if not resume and find_checkpoint(out) is not None:
        raise LongMemError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    state = load_trainer_state(ckpt) if ckpt else None
    if state is not None:
        check_resumable(cfg, state, ckpt, world)
    tokenizer = resolve_tokenizer(cfg.tokenizer or cfg.backbone)
    docs = encode_documents(cfg.corpus.data, tokenizer, progress=cfg.progress and rank == 0)  # bad data fails fast
    model = build_model(cfg, ckpt, state).to(device).train()
    T = check_data(cfg, model, tokenizer, docs, world)
    val_docs = encode_documents(cfg.corpus.val_data, tokenizer)[: cfg.corpus.eval_docs] if cfg.corpus.val_data else []
    val_docs = [d[: cfg.corpus.eval_segments * T + 1] for d in val_docs]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    streams = DocumentStreams(docs, cfg.corpus.batch_size, T, loop=True, seed=cfg.seed, rank=rank, world_size=world, pad_id=pad)
    amp = autocast_dtype(cfg.optim.precision, device)
    if cfg.scale.dtype == "bf16" and amp is None:
        raise LongMemError("--dtype bf16 runs the fp32 SideNet on a bf16 backbone under autocast; use --precision bf16 (or auto on bf16 hardware)")
    memory = model.new_memory(cfg.corpus.batch_size, dtype=amp)  # stored in the compute dtype: no per-step casts
    if model.trainable_module is not None:
        model.trainable_module.grad_checkpointing = cfg.scale.grad_checkpointing
    return Run(cfg, rank, world, device, out, tokenizer, model, streams, memory, amp, val_docs), state


def check_resumable(cfg: TrainConfig, state: dict, ckpt: Path, world: int) -> None:
    """A checkpoint resumes under either strategy, with the number of processes that wrote it."""
    n = len(state["streams"])
    if n != world:
        raise LongMemError(f"{ckpt} was written by {n} process(es), this run has {world}: each process owns its data streams "
                           f"and memories, so resume with {n} (torchrun, nodes x processes per node = {n}); to go on with "
                           f"{world}, start a new run from its weights with --init-from {ckpt}")
    if state.get("lora") != cfg.scale.lora:
        raise LongMemError(f"{ckpt} was trained with LoRA settings {state.get('lora')}, this run asks for {cfg.scale.lora}; "
                           "resume with the same --lora-rank/--lora-alpha")
    if cfg.scale.strategy == "fsdp" and state.get("optimizer_format") != OPTIMIZER_FORMAT:
        raise LongMemError(f"{ckpt} was written by an older longmem whose optimizer state only DDP reads; resume it with --strategy ddp")


def distribute(run: Run) -> None:
    """Spread the model over the processes (DDP or FSDP) and build the optimizer over what trains."""
    cfg, model = run.cfg, run.model
    run.net = model
    if cfg.scale.strategy == "fsdp":
        run.net = shard(model, run.device, shard_backbone=cfg.scale.shard_backbone)
    elif run.world > 1:
        run.net = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    run.optim = make_optimization(cfg.optim, cfg.schedule.max_steps, model.trainable_parameters(), run.amp)


def build_model(cfg: TrainConfig, ckpt: Path | None, state: dict | None):
    """The model of ``cfg.method``: from the checkpoint when resuming, else fresh (or ``--init-from``);
    with LoRA adapters on the SideNet when asked (the same adapters on all processes)."""
    if cfg.method != "longmem":
        cls = BASELINES[cfg.method]
        return cls.from_pretrained(ckpt) if ckpt else cls.from_backbone(cfg.backbone, cfg.model_config(), cfg.train_layers)
    dtype = torch.bfloat16 if cfg.scale.dtype == "bf16" else None
    backbone = load_causal_lm(cfg.backbone, dtype=dtype)
    if ckpt:
        model = LongMem.from_pretrained(ckpt, backbone=backbone)
    elif cfg.init_from:
        model = LongMem.from_pretrained(cfg.init_from, backbone=backbone, **cfg.retrieval_overrides())
    else:
        model = LongMem.from_backbone(backbone, cfg.model_config())
    model.sidenet.float()  # trains in fp32 (autocast), whatever the backbone's dtype
    lora = cfg.scale.lora
    if lora:
        with torch.random.fork_rng():  # the same adapters on every process, the processes' RNG untouched
            torch.manual_seed(cfg.seed)
            add_lora(model.sidenet, lora["rank"], lora["alpha"])
        if state is not None:  # the checkpoint's weights are merged; the adapters come from trainer.pt
            model.sidenet.load_state_dict(state["lora_sidenet"])
    return model


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
    if cfg.corpus.batch_size * world > segments:  # more rows would only repeat the same segments (and an enormous count hang)
        raise LongMemError(f"--batch-size {cfg.corpus.batch_size} x {world} process(es) is more rows than the training data has segments "
                           f"({segments} of {T} tokens); give a smaller --batch-size or more text")
    return T


def make_optimization(optim: OptimConfig, total_steps: int, params: list, amp: torch.dtype | None) -> Optimization:
    """AdamW (no decay on 1-D parameters), linear warmup then linear decay to 0 at ``total_steps``, clipping, a
    scaler for fp16."""
    opt = adamw(params, optim.lr, optim.betas, optim.eps, optim.weight_decay)
    sched = schedule(opt, warmup=optim.warmup_steps, total=total_steps, decay="linear", final=0.0)
    scaler = torch.amp.GradScaler(params[0].device.type, enabled=amp == torch.float16)
    return Optimization(opt, sched, scaler, params, optim.grad_clip, amp)


def start_outputs(run: Run, fresh: bool) -> None:
    """A fresh run's empty metrics and its config; a resumed run's metrics cut back to the checkpoint's step (a run
    killed after its last checkpoint logged steps that the resumed run does again)."""
    run.out.mkdir(parents=True, exist_ok=True)
    if run.rank != 0:
        return
    metrics = run.out / "metrics.jsonl"
    if fresh:
        atomic_write(metrics, lambda tmp: Path(tmp).write_text(""))
        atomic_write(run.out / "train_config.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(run.cfg.to_dict(), indent=2, default=str) + "\n"))
    elif metrics.is_file():
        kept = [line for line in open(metrics) if line.strip() and json.loads(line).get("step", 0) <= run.step]
        atomic_write(metrics, lambda tmp: Path(tmp).write_text("".join(kept)))


# -- resume and checkpoints ------------------------------------------------------------------------


def resume_streams(run: Run, state: dict) -> None:
    """Counters, stream positions and RNG from the checkpoint; each row's memory rebuilt (before sharding)."""
    run.step, run.tokens, run.elapsed_before = state["step"], state["tokens"], state["elapsed"]
    run.streams.load_state_dict(state["streams"][run.rank])
    rng = state["rng"][run.rank]
    device_rng = state.get("device_rng")  # checkpoints written before rng_state: the device's state beside the CPU's
    if device_rng is not None and device_rng[run.rank] is not None:
        rng = {"cpu": rng, run.device.type: device_rng[run.rank]}
    set_rng_state(rng, run.device)
    memories = state.get("memories")
    if memories is not None:  # the memory depends on trained weights: restored as it was (see keeps_memory)
        with tempfile.TemporaryDirectory(dir=run.out) as d:
            (Path(d) / "memory.safetensors").write_bytes(memories[run.rank])
            run.memory = MemoryBank.load(Path(d) / "memory.safetensors", device=run.device)
    else:
        rebuild_memory(run)


def resume_optimizer(run: Run, state: dict) -> None:
    """Optimizer (by parameter name: any strategy), schedule and scaler from the checkpoint."""
    if state.get("optimizer_format") == OPTIMIZER_FORMAT:
        load_optimizer_state(run.model, run.optim.optimizer, state["optimizer"])
    else:  # written before the format was recorded: the optimizer's own (same parameters, same order)
        run.optim.optimizer.load_state_dict(state["optimizer"])
    run.optim.load_state_dict(state)
    if run.rank == 0:
        print(f"resumed from {run.out} at step {run.step}")


def checkpoint(run: Run) -> None:
    """Every process's RNG and stream positions, the model and optimizer, written by rank 0 atomically."""
    mine = (rng_state(run.device), run.streams.state_dict(), memory_bytes(run) if keeps_memory(run.cfg) else None)
    gathered = [mine]
    if run.world > 1:
        gathered = [None] * run.world
        torch.distributed.all_gather_object(gathered, mine)
    weights, unmerged = model_weights(run)  # collectives under FSDP: every process
    trainer = {"optimizer": optimizer_state(run.model, run.optim.optimizer), "optimizer_format": OPTIMIZER_FORMAT,
               **run.optim.state_dict(), "step": run.step, "tokens": run.tokens,
               "elapsed": run.elapsed_before + time.time() - run.t0, "streams": [g[1] for g in gathered],
               "rng": [g[0] for g in gathered], "strategy": run.cfg.scale.strategy,
               "lora": run.cfg.scale.lora}
    if keeps_memory(run.cfg):
        trainer["memories"] = [g[2] for g in gathered]
    if unmerged is not None:
        trainer["lora_sidenet"] = unmerged
    if run.rank == 0:
        save_checkpoint(run.out, run.model, trainer, tokenizer=run.tokenizer, weights=weights)
        run.log({"step": run.step, "checkpoint": "saved"})  # written after the swap: a step reported here is never lost
    if run.world > 1:
        torch.distributed.barrier()


def keeps_memory(cfg: TrainConfig) -> bool:
    """Whether the checkpoint stores the memories: MemTRM's memory holds keys of the backbone it trains, written by
    the weights of each step, so replaying the segments with the checkpoint's weights would not give it back.
    LongMem's memory is a pure function of the segments read (the backbone is frozen) and is rebuilt instead."""
    return cfg.method == "memtrm"


def memory_bytes(run: Run) -> bytes:
    """This process's memory as the bytes of a memory file (``MemoryBank.save``)."""
    with tempfile.TemporaryDirectory(dir=run.out) as d:
        run.memory.save(Path(d) / "memory.safetensors")
        return (Path(d) / "memory.safetensors").read_bytes()


def model_weights(run: Run) -> tuple[dict | None, dict | None]:
    """(the SideNet weights to save, gathered and LoRA merged; the unmerged LoRA SideNet or None).
    (None, None) for the baselines, which save themselves. Every process must call it."""
    module = run.model.trainable_module
    if module is None:
        return None, None
    state = full_state(module)
    layers = lora_layers(module)
    return (merge_lora(state, layers), state) if layers else (state, None)


@torch.no_grad()
def rebuild_memory(run: Run) -> None:
    """Refill each row's memory with the segments it already read of its current document."""
    amp = run.amp
    for b in range(run.streams.B):
        segments = run.streams.replay_segments(b)
        if segments:
            with torch.autocast(run.device.type, dtype=amp, enabled=amp is not None):
                run.model.write_memory(torch.cat(segments, dim=1), run.memory, rows=[b])


# -- measurements ----------------------------------------------------------------------------------


def validate(run: Run) -> dict:
    """Validation loss with and without memory (rank 0; every process under FSDP, whose forward is collective),
    logged; {} without validation data and on the other processes."""
    if not run.val_docs or (run.rank != 0 and run.cfg.scale.strategy != "fsdp"):
        return {}
    kw = dict(segment_length=run.model.segment_length, batch_size=min(len(run.val_docs), run.cfg.corpus.batch_size),
              autocast=run.amp)
    res = {}
    for mode in ("longmem", "no_memory"):
        s = stream_nll(run.model, run.val_docs, mode, **kw).summary()
        res[f"val_loss_{mode}"] = s["loss"]
        res[f"val_loss_beyond_{mode}"] = math.log(s["ppl_beyond_window"]) if s["ppl_beyond_window"] else None
    run.model.train()
    run.log({"step": run.step, **res})
    return res if run.rank == 0 else {}


def measure_staleness(run: Run) -> None:
    """Rank 0: how far row 0's stored keys are from what the current weights compute."""
    if run.rank != 0:
        return
    amp = run.amp
    with torch.autocast(run.device.type, dtype=amp, enabled=amp is not None):
        run.log({"step": run.step, "staleness": staleness(run.model, run.memory, run.streams.replay_segments(0)[-32:])})


def all_ranks(flag: bool, run: Run) -> bool:
    """Whether ``flag`` holds on every process (one all-reduce; the flag itself in one process). The flag travels
    on the process's device: nccl reduces CUDA tensors only."""
    if run.world == 1:
        return flag
    t = torch.tensor([float(flag)], device=run.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return bool(t.item())


def over_time_limit(run: Run) -> bool:
    """--max-minutes reached (on any process: all stop together)."""
    out_of_time = run.cfg.schedule.max_minutes is not None and (time.time() - run.t0) / 60 >= run.cfg.schedule.max_minutes
    return not all_ranks(not out_of_time, run)


def gate_values(model) -> list[float]:
    gate = full_tensor(model.gate)  # gathered under FSDP
    return [round(float(g), 4) for g in torch.sigmoid(gate.detach())]


def finish(run: Run, last: dict, stop_reason: str) -> dict:
    """Final validation, the trained model in OUT, the loss plot; the process group closed."""
    last.update(validate(run))
    weights, _ = model_weights(run)
    if run.rank == 0:
        if weights is None:
            run.model.save_pretrained(run.out, tokenizer=run.tokenizer)
        else:
            run.model.save_pretrained(run.out, tokenizer=run.tokenizer, state=weights)
        plot_metrics(run.out / "metrics.jsonl", run.out / "loss.png")
        last["stop_reason"] = stop_reason
    if run.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return last


def plot_metrics(metrics_path: Path, png: Path) -> None:
    """The run's learning curves from its ``metrics.jsonl``: training loss and validation with and without memory."""
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    checks = {label: [(r["step"], r[key]) for r in rows if r.get(key) is not None]
              for key, label in (("val_loss_longmem", "val loss, with memory"), ("val_loss_no_memory", "val loss, no memory"))}
    plot_loss_curves(png, train, checks, smooth=max(1, len(train) // 50), title="LongMem memory-augmented adaptation")
