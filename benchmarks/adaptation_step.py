"""Adaptation step: one LongMem training step against one full fine-tuning step of the backbone.

Both steps are ``longmem.training.step.train_step``, the step ``longmem train`` runs (autocast, GradScaler
where fp16, gradient clipping at 1.0, AdamW without decay on 1-D parameters), on the same batch (B rows x
T tokens):

    longmem step     frozen backbone forward (all L blocks, no grad) + SideNet (L/2 blocks) forward
                     with retrieval from a *full* memory (M tokens per row, chunk 4, k_c 16) + write
                     of the segment (FIFO eviction) + loss + backward + AdamW over the SideNet
    full fine-tune   the same HF model (a trainable copy) forward + loss + backward + AdamW over all
                     of its weights, the usual alternative to LongMem's memory-augmented adaptation

The LongMem step is split with timers on the real call (forward hooks on the model and the backbone,
wrappers on the memory's ``search`` and ``add`` and the optimizer's ``step``): backbone fwd / retrieval /
write / SideNet fwd (the rest of the forward) / loss + backward + clipping (the rest of the step) / optimizer. ``--profile`` also prints torch.profiler's
top operators for one step.

    python benchmarks/adaptation_step.py           # full: default-model shape, 8 x 256, 65K memory per row
    python benchmarks/adaptation_step.py --quick   # seconds
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


def build_parser():
    p = common.parser("adaptation_step", __doc__)
    p.add_argument("--batch", type=int, default=None, help="rows B (default 8; quick 2)")
    p.add_argument("--tokens", type=int, default=None, help="segment length T (default 256; quick 64)")
    p.add_argument("--memory-size", type=int, default=None, help="memory tokens per row, filled before timing (default 65536; quick 4096)")
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--topk-chunks", type=int, default=16)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast as in `longmem train` (auto: bf16 where the CPU/GPU supports it)")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's top operators of one LongMem step")
    return p


def main(argv=None) -> dict:
    args = common.parse(build_parser(), argv)
    device = common.setup(args)
    started = time.perf_counter()
    from longmem.training.step import MicroBatch, train_step
    from longmem.training.config import OptimConfig
    from longmem.training.train import make_optimization

    B = args.batch or (2 if args.quick else 8)
    T = args.tokens or (64 if args.quick else 256)
    M = args.memory_size or (4096 if args.quick else 65536)
    model, shape = common.make_model(args, device, chunk_size=args.chunk_size, memory_size=M,
                                     topk_chunks=args.topk_chunks, segment_length=T)
    amp = common.autocast_dtype(args.precision, device)
    # the full fine-tuning reference: a trainable copy of the same HF model, in its own (HF) forward
    full = copy.deepcopy(model.backbone.model).to(device).train().requires_grad_(True)
    full.config.use_cache = False
    model.train()
    memory = model.new_memory(B, backend="auto")
    common.fill_memory(memory, M, seed=args.seed)
    assert all(memory.num_tokens(b) == M for b in range(B)), "memory should be full before timing"
    g = torch.Generator().manual_seed(args.seed)
    seq = torch.randint(0, shape["vocab"], (B, T + 1), generator=g)
    batch = MicroBatch(seq[:, :-1], seq[:, 1:])  # inputs and the token after each

    # the optimizer, clipping and scaler of `longmem train` (its defaults), lr as in the earlier versions
    settings = OptimConfig(lr=1e-5)
    optim_side = make_optimization(settings, 10**9, model.trainable_parameters(), amp)
    optim_full = make_optimization(settings, 10**9, list(full.parameters()), amp)

    sw = common.Stopwatch(device)
    common.time_module(model, sw, "forward")
    common.time_module(model.backbone, sw, "backbone fwd")
    common.timed_method(memory, "search", sw, "retrieval")
    common.timed_method(memory, "add", sw, "write")
    span = {}  # the optimizer's step, timed by its own hooks (the scheduler is wrapped around step already)
    optim_side.optimizer.register_step_pre_hook(lambda *_: span.update(t=sw("optimizer")) or span["t"].__enter__())
    optim_side.optimizer.register_step_post_hook(lambda *_: span.pop("t").__exit__(None, None, None))

    def longmem_step():  # exactly the step `longmem train` runs
        with sw("step"):
            train_step(model, [batch], optim_side, memory=memory)

    def full_step():
        train_step(full, [batch], optim_full)

    # interleave the two so that drift in machine load hits both alike
    for _ in range(args.warmup):
        longmem_step()
        full_step()
    lm_times, full_times, splits = [], [], []
    for _ in range(args.repeats):
        sw.reset()
        lm_times += common.bench(longmem_step, args, warmup=0, repeats=1)["times_s"]
        splits.append(dict(sw.totals))
        full_times += common.bench(full_step, args, warmup=0, repeats=1)["times_s"]
    assert all(memory.num_tokens(b) == M for b in range(B)), "memory stays full (FIFO) across steps"

    lm, ft = common.summarize(lm_times), common.summarize(full_times)
    tokens = B * T
    rows = [
        {"step": "longmem (SideNet + retrieval + write)", "median_ms": lm["median_s"] * 1e3, "min_ms": lm["min_s"] * 1e3,
         "max_ms": lm["max_s"] * 1e3, "tok_per_s": tokens / lm["median_s"], "ratio": lm["median_s"] / ft["median_s"]},
        {"step": "full fine-tuning (backbone)", "median_ms": ft["median_s"] * 1e3, "min_ms": ft["min_s"] * 1e3,
         "max_ms": ft["max_s"] * 1e3, "tok_per_s": tokens / ft["median_s"], "ratio": 1.0},
    ]
    missing = {"backbone fwd", "retrieval", "write"} - set(splits[0])
    if missing:  # the timers hook model.backbone(...), memory.search and memory.add: the model must still call them
        print(f"warning: no time recorded for {sorted(missing)}; LongMem.forward no longer calls them as hooked here, "
              f"so their time is counted in 'sidenet fwd'", file=sys.stderr)
    split = {k: sorted(s.get(k, 0.0) for s in splits)[len(splits) // 2]
             for k in ("step", "forward", "backbone fwd", "retrieval", "write", "optimizer")}
    sidenet_fwd = split["forward"] - split["backbone fwd"] - split["retrieval"] - split["write"]
    backward = split["step"] - split["forward"] - split["optimizer"]  # loss, backward, unscale, clipping
    parts = [("backbone fwd", split["backbone fwd"]), ("retrieval", split["retrieval"]), ("write", split["write"]),
             ("sidenet fwd", sidenet_fwd), ("loss + sidenet bwd + clip", backward), ("optimizer", split["optimizer"])]
    total = sum(v for _, v in parts)
    split_rows = [{"part": name, "median_ms": v * 1e3, "share": v / total} for name, v in parts]
    print(common.table(split_rows, ["part", "median_ms", "share"], title="\nlongmem step, split (medians per part)"))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            longmem_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))

    ratio = lm["median_s"] / ft["median_s"]
    targets = [common.target("longmem step / full fine-tuning step", ratio, "<=", 1.0,
                             f"retrieval {split['retrieval'] / total:.0%} of the LongMem step")]
    config = {"batch": B, "tokens": T, "memory_size_per_row": M, "chunk_size": args.chunk_size,
              "topk_chunks": args.topk_chunks, "precision": args.precision, "autocast": str(amp) if amp else None,
              "retrieval_backend": memory._backend(), "model": shape}
    return common.finish(args, "adaptation_step", config, rows, targets,
                         ["step", "median_ms", "min_ms", "max_ms", "tok_per_s", "ratio"], started,
                         extra={"split": split_rows})


if __name__ == "__main__":
    main()
