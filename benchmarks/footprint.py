"""Footprint: bytes per stored memory token, and the peak memory of one training step.

1. Memory bank bytes per token: ``MemoryBank.nbytes() / stored tokens`` against the raw key/value
   bytes (2 x Hkv x Dh x dtype bytes). The bank also keeps one mean key per chunk (1 / (2 csz) more)
   and allocates by doubling until full, so a partly filled bank (shown too) carries slack; the
   target is for a full bank. Banks are filled 1,024 tokens per write, as ingest writes them.
2. Process memory, each measured in a fresh subprocess (Linux /proc/self/status): resident set size
   (VmRSS) and its high-water mark (VmHWM), reset before the measured phase through
   /proc/self/clear_refs, so a phase's peak is its own:
     fill        a one-row bank filled to M tokens: resident growth and peak over ``nbytes()``
     longmem     one LongMem training step (B rows, full memories): peak above the set-up process
     finetune    one full fine-tuning step of the same backbone on the same batch
   On CUDA, ``torch.cuda.max_memory_allocated`` is reported as well.

    python benchmarks/footprint.py            # full: sizes 4K .. 1M tokens; default-model shape, 8 x 256, 65K memory per row
    python benchmarks/footprint.py --quick    # seconds
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL_SIZES = [4096, 16384, 65536, 262144, 1048576]
QUICK_SIZES = [4096]
SEGMENT = 1024  # banks are filled segment by segment, as training and ingest write them


def build_parser():
    p = common.parser("footprint", __doc__)
    p.add_argument("--sizes", type=int, nargs="+", help=f"bank sizes in tokens (default {FULL_SIZES}; quick {QUICK_SIZES})")
    p.add_argument("--heads", type=int, default=4, help="key/value heads of the bank rows (default 4, longmem-tiny's)")
    p.add_argument("--head-dim", type=int, default=64, help="Dh (default 64)")
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--batch", type=int, default=None, help="training-step rows (default 8; quick 2)")
    p.add_argument("--tokens", type=int, default=None, help="training-step segment length (default 256; quick 64)")
    p.add_argument("--memory-size", type=int, default=None, help="training-step memory per row (default 65536; quick 4096)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto", help="training-step autocast (as `longmem train`)")
    p.add_argument("--child", choices=["fill", "longmem", "finetune"], help=argparse_hidden())
    return p


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


# -- /proc -----------------------------------------------------------------------------------------


def _status(field: str) -> int:
    """A Vm* field of /proc/self/status (VmRSS, VmHWM, ...), in bytes."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def phase(fn, device) -> dict:
    """Run ``fn``; resident set before and after, and the phase's own peak (bytes)."""
    import gc

    gc.collect()
    before = _status("VmRSS")
    resettable = reset_peak()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    fn()
    out = {"rss_before": before, "rss_after": _status("VmRSS"), "peak": _status("VmHWM"), "peak_is_phase_own": resettable}
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_before"] = cuda_before
        out["cuda_peak"] = torch.cuda.max_memory_allocated()
    return out


# -- children --------------------------------------------------------------------------------------


def child(args) -> dict:
    device = common.setup(args)
    from longmem.memory import MemoryBank
    from longmem.training.step import MicroBatch, train_step
    from longmem.training.config import OptimConfig
    from longmem.training.train import make_optimization

    if args.child == "fill":
        M = max(args.sizes or (QUICK_SIZES if args.quick else [65536]))
        bank = MemoryBank(1, args.heads, args.head_dim, chunk_size=args.chunk_size, memory_size=M, device=device)
        res = phase(lambda: common.fill_memory(bank, M, seed=args.seed, piece=SEGMENT), device)
        return {**res, "tokens": M, "nbytes": bank.nbytes()}

    B = args.batch or (2 if args.quick else 8)
    T = args.tokens or (64 if args.quick else 256)
    M = args.memory_size or (4096 if args.quick else 65536)
    model, shape = common.make_model(args, device, memory_size=M, segment_length=T)
    amp = common.autocast_dtype(args.precision, device)
    seq = torch.randint(0, shape["vocab"], (B, T + 1), generator=torch.Generator().manual_seed(args.seed))
    batch = MicroBatch(seq[:, :-1], seq[:, 1:])
    extra, memory = {}, None
    if args.child == "longmem":
        model.train()
        memory = model.new_memory(B)
        common.fill_memory(memory, M, seed=args.seed)
        extra["memory_nbytes"] = memory.nbytes()
        net, params = model, model.trainable_parameters()
    else:
        net = copy.deepcopy(model.backbone.model).train().requires_grad_(True)
        net.config.use_cache = False
        del model
        params = list(net.parameters())
    # the step and optimizer of `longmem train` (its defaults; lr as before)
    optim = make_optimization(OptimConfig(lr=1e-5), 10**9, params, amp)

    def step():
        train_step(net, [batch], optim, memory=memory)

    first = phase(step, device)  # the first step also allocates AdamW's state
    second = phase(step, device)
    return {"first_step": first, "step": second, "batch": B, "tokens": T, "memory_size_per_row": M,
            "trainable_params": sum(p.numel() for p in params), **extra}


def spawn(args, name: str) -> subprocess.Popen:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", name, *args.argv]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


def collect(proc: subprocess.Popen, name: str) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"footprint child {name!r} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


# -- main ------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = common.parse(build_parser(), argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    device = common.setup(args)
    started = time.perf_counter()
    # the subprocesses measure memory, not time: run them while the in-process part runs
    procs = {name: spawn(args, name) for name in ("fill", "longmem", "finetune")}

    from longmem.memory import MemoryBank

    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    H, Dh, csz = args.heads, args.head_dim, args.chunk_size
    rows = []
    cases = [(M, "float32", M) for M in sizes] + [(max(sizes), d, max(sizes)) for d in ("bfloat16", "float16")]
    cases.append((max(sizes), "float32", max(sizes) // 2 + 64 * csz))  # just over half full: doubling slack
    for M, dtype, fill in cases:
        bank = MemoryBank(1, H, Dh, chunk_size=csz, memory_size=M, dtype=DTYPES[dtype], device=device)
        common.fill_memory(bank, fill, seed=args.seed, piece=SEGMENT)
        stored = bank.num_tokens(0)
        raw = 2 * H * Dh * DTYPES[dtype].itemsize
        rows.append({"memory_size": M, "stored_tokens": stored, "full": stored == M, "dtype": dtype,
                     "nbytes": bank.nbytes(), "bytes_per_token": bank.nbytes() / stored, "raw_bytes_per_token": raw,
                     "ratio": bank.nbytes() / stored / raw})
        del bank
    full_rows = [r for r in rows if r["full"]]
    targets = [common.target("bank bytes per token / raw K+V bytes (full)", max(r["ratio"] for r in full_rows), "<=", 1.3,
                             f"worst of {len(full_rows)} full banks; chunk-mean keys add 1/(2 csz) = {1 / (2 * csz):.3f}")]

    fill = collect(procs["fill"], "fill")
    lm = collect(procs["longmem"], "longmem")
    ft = collect(procs["finetune"], "finetune")
    mib = 2**20
    fill_row = {"tokens": fill["tokens"], "nbytes_mib": fill["nbytes"] / mib,
                "rss_growth_mib": (fill["rss_after"] - fill["rss_before"]) / mib,
                "peak_over_start_mib": (fill["peak"] - fill["rss_before"]) / mib,
                "rss_growth_over_nbytes": (fill["rss_after"] - fill["rss_before"]) / fill["nbytes"],
                "peak_over_nbytes": (fill["peak"] - fill["rss_before"]) / fill["nbytes"]}
    step_rows = []
    for name, res in (("longmem step", lm), ("full fine-tuning step", ft)):
        first, s = res["first_step"], res["step"]
        r = {"step": name, "process_rss_mib": first["rss_before"] / mib,
             "peak_rss_mib": max(first["peak"], s["peak"]) / mib,
             "first_step_over_rss_mib": (first["peak"] - first["rss_before"]) / mib,
             "step_over_rss_mib": (s["peak"] - s["rss_before"]) / mib,
             "memory_bank_mib": res.get("memory_nbytes", 0) / mib, "trainable_params": res["trainable_params"]}
        if "cuda_peak" in s:
            r["cuda_peak_mib"] = max(first["cuda_peak"], s["cuda_peak"]) / mib
        step_rows.append(r)
    print(common.table([fill_row], list(fill_row), title="\nfilling one bank row (fresh process)"))
    print(common.table(step_rows, ["step", "process_rss_mib", "peak_rss_mib", "first_step_over_rss_mib",
                                   "step_over_rss_mib", "memory_bank_mib", "trainable_params"]
                       + (["cuda_peak_mib"] if device.type == "cuda" else []),
                       title="\none training step (fresh process each; peaks from VmHWM; the first step also allocates AdamW state)"))
    config = {"sizes": sizes, "heads": H, "head_dim": Dh, "chunk_size": csz, "batch": lm["batch"], "tokens": lm["tokens"],
              "memory_size_per_row": lm["memory_size_per_row"], "precision": args.precision,
              "peak_is_phase_own": lm["step"]["peak_is_phase_own"]}
    return common.finish(args, "footprint", config, rows, targets,
                         ["memory_size", "stored_tokens", "dtype", "nbytes", "bytes_per_token", "raw_bytes_per_token", "ratio"],
                         started, extra={"fill": fill_row, "steps": step_rows, "raw_children": {"fill": fill, "longmem": lm, "finetune": ft}})


if __name__ == "__main__":
    main()
