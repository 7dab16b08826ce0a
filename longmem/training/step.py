"""The one training step, the optimizer it steps and the learning-rate schedule.

``train_step`` is what ``longmem train`` runs for every method (LongMem, the MemTRM and fine-tuning
baselines), what ``longmem pretrain`` runs, and what ``benchmarks/adaptation_step.py`` times:

    for each micro-batch: reset the rows that start a new document, forward under autocast,
                          next-token loss, backward (scaled by the GradScaler when fp16)
    unscale -> clip the gradient norm -> optimizer step (skipped by the scaler on inf/nan) -> schedule

Under DDP or FSDP the gradients are synchronised once, after the last micro-batch.

``rng_state`` / ``set_rng_state``: the random state a training checkpoint keeps (torch's CPU generator and the
accelerator's of the process's device), so a resumed run draws what the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch.nn.parallel import DistributedDataParallel

from longmem.model import IGNORE, next_token_loss


@dataclass
class MicroBatch:
    """What ``train_step`` reads from a micro-batch (``data.streams.Batch`` has the same fields)."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) the token after each input, IGNORE where unscored
    reset: tuple = ()  # rows whose memory starts afresh before this micro-batch
    memory: object = None  # this micro-batch's own memory bank, instead of the one train_step is given
    scored_only: bool = False  # logits only where targets are scored (the model takes ``logits_at``; LongMem does)


@dataclass
class Optimization:
    """Everything one optimizer step needs besides the model and the data."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler  # enabled only for fp16 autocast
    params: list  # the trained parameters (clipped together)
    grad_clip: float | None  # max global gradient norm (None: no clipping)
    autocast: torch.dtype | None  # forward precision; weights and optimizer state stay fp32

    def state_dict(self) -> dict:
        return {"scheduler": self.scheduler.state_dict() if self.scheduler else None, "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


@dataclass
class StepStats:
    loss: float  # mean over the micro-batches of this process
    grad_norm: float  # before clipping; nan when the step was skipped
    tokens: int  # scored tokens of this process
    finite: bool  # False: the loss was inf/nan and no optimizer step was taken


def adamw(params, lr: float, betas=(0.9, 0.98), eps: float = 1e-6, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: 1-D parameters (norms, biases, LongMem's gate) are not
    decayed (fairseq, the official release, decays all).

    On CPU and CUDA it is torch's fused AdamW: one kernel over all parameters instead of a dozen passes (for a full
    SideNet of SmolLM2-135M, 53M parameters, 21 ms a step against 49 on 2 CPU cores), the same update to float
    rounding."""
    params = list(params)
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


def lr_factor(step: int, *, warmup: int, total: int, decay: str = "linear", final: float = 0.0) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based): linear warmup to 1 over
    ``warmup`` steps, then ``decay`` ("linear" or "cosine") to ``final`` at step ``total`` and after.

    ``longmem train``: linear to 0 (the paper's schedule); ``longmem pretrain``: cosine to a floor."""
    if step < warmup:
        return (step + 1) / warmup
    if step >= total:
        return final
    if decay == "linear":
        return final + (1 - final) * ((total - step) / (total - warmup))
    progress = (step - warmup) / (total - warmup)
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


def schedule(optimizer, *, warmup: int, total: int, decay: str = "linear", final: float = 0.0):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=warmup, total=total, decay=decay, final=final))


def train_step(net: torch.nn.Module, micro_batches: Iterable, optim: Optimization, memory=None) -> StepStats:
    """One optimizer step over ``micro_batches`` (each with ``input_ids``, ``targets``, ``reset``).

    ``net``: the model, or its DDP wrapper; it is called as ``net(ids, memory=memory)`` (``net(ids)``
    without a memory, e.g. a plain HF causal LM) and must return an object with ``.logits`` (B, T, V).
    ``memory``: the rows' memory bank; the rows in a micro-batch's ``reset`` are cleared before it.
    """
    micro_batches = list(micro_batches)
    device = optim.params[0].device
    loss_sum, tokens = 0.0, 0
    for i, batch in enumerate(micro_batches):
        mem = memory if getattr(batch, "memory", None) is None else batch.memory
        if mem is not None and batch.reset:
            mem.reset(list(batch.reset))
        ids, targets = batch.input_ids.to(device), batch.targets.to(device)
        with _gradient_sync(net, i == len(micro_batches) - 1):
            scored = {"logits_at": targets != IGNORE} if getattr(batch, "scored_only", False) else {}
            with torch.autocast(device.type, dtype=optim.autocast, enabled=optim.autocast is not None):
                logits = (net(ids, **scored) if mem is None else net(ids, memory=mem, **scored)).logits
            if scored:
                targets = targets[scored["logits_at"]][None]
            loss = next_token_loss(logits, targets, shifted=True)
            optim.scaler.scale(loss / len(micro_batches)).backward()
        loss_sum += loss.item() / len(micro_batches)
        tokens += int((targets != IGNORE).sum())
    if not math.isfinite(loss_sum):
        optim.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss_sum, float("nan"), tokens, finite=False)
    optim.scaler.unscale_(optim.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(optim.params, optim.grad_clip if optim.grad_clip else math.inf)
    optim.scaler.step(optim.optimizer)
    optim.scaler.update()
    optim.optimizer.zero_grad(set_to_none=True)
    if optim.scheduler is not None:
        optim.scheduler.step()
    if hasattr(grad_norm, "full_tensor"):  # FSDP (a DTensor): the norm of the sharded gradients, already reduced
        grad_norm = grad_norm.full_tensor()
    return StepStats(loss_sum, float(grad_norm), tokens, finite=True)


def rng_state(device: torch.device) -> dict:
    """This process's torch random state: ``{"cpu": ...}``, plus ``{device.type: ...}`` (e.g. "cuda") for an
    accelerator, the state of ``device`` only (under torchrun each process owns one device; reading every device's
    would open a context on each). Python's and NumPy's global generators are not kept: training draws from its own
    seeded generators (``data.streams``, ``adapt``), never from them."""
    state = {"cpu": torch.get_rng_state()}
    if device.type != "cpu":
        state[device.type] = torch.get_device_module(device).get_rng_state(device)
    return state


def set_rng_state(state, device: torch.device) -> None:
    """Restore what ``rng_state`` returned. A bare tensor (checkpoints before the dict) is the CPU state alone;
    an accelerator's state saved on another kind of device (a GPU run resumed on the CPU) is left out."""
    if isinstance(state, torch.Tensor):
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"].cpu())  # .cpu(): a checkpoint loaded with map_location=device moved it
    if device.type != "cpu" and state.get(device.type) is not None:
        torch.get_device_module(device).set_rng_state(state[device.type].cpu(), device)


def _gradient_sync(net, last: bool):
    """Synchronise gradients across processes only after the last micro-batch (DDP no_sync / FSDP)."""
    if last:
        return contextlib.nullcontext()
    if isinstance(net, DistributedDataParallel):
        return net.no_sync()
    if hasattr(net, "set_requires_gradient_sync"):  # an FSDP2 module
        return _fsdp_no_sync(net)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(net):
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)
