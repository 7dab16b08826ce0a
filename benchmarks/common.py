"""Shared helpers for the benchmark scripts: flags, timing, machine facts, models, JSON output.

Every benchmark script follows one pattern:

    args = parse(parser("name", __doc__))       # --quick --repeats --warmup --json --device --model --threads
    device = setup(args)                        # threads, seed, device check
    stats = bench(fn, args)                     # warm-up, then ``repeats`` timed calls; medians
    finish(args, "name", config, rows, targets) # prints a table, writes JSON (schema in benchmarks/README.md)

Timing: ``time.perf_counter`` around each call, with ``torch.cuda.synchronize`` before and after on
CUDA. Figures are medians over the repeats; min and max are kept in the JSON so noise is visible.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT) not in sys.path:  # run as `python benchmarks/x.py` from a checkout without installing
    sys.path.insert(0, str(ROOT))

from longmem.io import atomic_write  # noqa: E402
from longmem.malloc import reuse_freed_memory  # noqa: E402

# longmem-tiny's shape (models/longmem-tiny): used when no --model is given in full mode.
DEFAULT_SHAPE = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                     tie_word_embeddings=True)
# Quick mode: same family and head layout (GQA 2:1, Dh 16), tiny sizes, so every path runs in seconds.
QUICK_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   tie_word_embeddings=True)
# The paper's backbone shape (GPT-2 medium: 24 layers, width 1024, 16 heads, 50K vocab, ~355M parameters) in the
# Llama family (SwiGLU width chosen for GPT-2's MLP parameter count): memory cost per token is independent of the
# width while the network's grows with it, so the adaptation-step ratio is only meaningful at this shape.
PAPER_SHAPE = dict(vocab_size=50304, hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                   num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048,
                   tie_word_embeddings=True)
SHAPES = {"default": DEFAULT_SHAPE, "quick": QUICK_SHAPE, "paper": PAPER_SHAPE}


# -- flags -----------------------------------------------------------------------------------------


def parser(name: str, description: str | None, full_repeats: int = 5) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, seconds (CI and the smoke test)")
    p.add_argument("--repeats", type=int, default=None, help=f"timed repeats per figure (default 3 quick, {full_repeats} full)")
    p.set_defaults(full_repeats=full_repeats)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--json", default=None,
                   help=f"where to write the results (default benchmarks/results/{name}.json; quick: results/quick/{name}.json)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to run (default cpu)")
    p.add_argument("--model", default=None,
                   help="a LongMem checkpoint folder (e.g. models/longmem-tiny); default: a random-weight model of "
                        "the default shape (quick: a tiny one)")
    p.add_argument("--shape", choices=list(SHAPES), default=None,
                   help="random-weight model shape without --model: default (longmem-tiny's: 8 x 256), quick "
                        "(4 x 64; the default with --quick) or paper (GPT-2 medium: 24 x 1024, 355M parameters)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default os.cpu_count())")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system-malloc", action="store_true",
                   help="leave glibc's malloc as it is (default: tuned as the longmem command line tunes it)")
    return p


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else args.full_repeats
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"--repeats must be >= 1 and --warmup >= 0 (got {args.repeats}, {args.warmup})")
    args.mode = "quick" if args.quick else "full"
    return args


def setup(args) -> torch.device:
    """Called first by every benchmark's main: environment, threads, seed, device check."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = args.threads or os.cpu_count()
    args.load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if args.load_at_start is not None and args.load_at_start >= 0.5 * (os.cpu_count() or 1):
        print(f"note: load average {args.load_at_start:.1f} on {os.cpu_count()} cores before this run: the figures are "
              f"contended (with another job running, --threads 1 avoids OpenMP oversubscription stalls)", file=sys.stderr)
    torch.set_num_threads(threads)
    args.malloc = "system" if args.system_malloc or not reuse_freed_memory() else "reuse freed memory"
    try:  # faiss has its own OpenMP pool: give it the same number of threads
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass
    torch.manual_seed(args.seed)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to torch here; use --device cpu")
    return torch.device(args.device)


# -- timing ----------------------------------------------------------------------------------------


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench(fn: Callable[[], object], args, device=None, repeats: int | None = None, warmup: int | None = None) -> dict:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed. Seconds: median, min, max, all."""
    device = device or args.device
    repeats = args.repeats if repeats is None else repeats
    for _ in range(args.warmup if warmup is None else warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return summarize(times)


def interleaved(cases: dict[str, Callable[[], object]], args, device=None, repeats: int | None = None,
                warmup: int | None = None) -> dict[str, dict]:
    """``bench`` for several cases compared with each other: each round calls every case once, so a drift in
    machine load hits all alike. ``{name: summary}`` (seconds: median, min, max, all)."""
    device = device or args.device
    repeats = args.repeats if repeats is None else repeats
    for _ in range(args.warmup if warmup is None else warmup):
        for fn in cases.values():
            fn()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            times[name] += bench(fn, args, device, repeats=1, warmup=0)["times_s"]
    return {name: summarize(t) for name, t in times.items()}


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "times_s": list(times)}


class Stopwatch:
    """Accumulates named intervals, e.g. from hooks inside one call: ``with sw("retrieval"): ...``."""

    def __init__(self, device):
        self.device = device
        self.totals: dict[str, float] = {}

    def __call__(self, name: str):
        sw = self

        class _Span:
            def __enter__(self):
                sync(sw.device)
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                sync(sw.device)
                sw.add(name, time.perf_counter() - self.t0)
                return False

        return _Span()

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def reset(self) -> None:
        self.totals = {}


def timed_method(obj, name: str, stopwatch: Stopwatch, label: str) -> None:
    """Wrap ``obj.name`` (an instance attribute now shadows the method) so each call is timed as ``label``."""
    original = getattr(obj, name)

    def wrapper(*a, **kw):
        with stopwatch(label):
            return original(*a, **kw)

    setattr(obj, name, wrapper)


def time_module(module: torch.nn.Module, stopwatch: Stopwatch, label: str) -> None:
    """Time every forward call of ``module`` as ``label`` (forward pre/post hooks)."""
    start = {}

    def pre(mod, inputs):
        sync(stopwatch.device)
        start["t"] = time.perf_counter()

    def post(mod, inputs, output):
        sync(stopwatch.device)
        stopwatch.add(label, time.perf_counter() - start.pop("t"))

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post)


def matmul_rate(device: torch.device, n: int, dtype=torch.float32, repeats: int = 3) -> float:
    """Measured dense matmul rate (FLOP/s) for n x n @ n x n in ``dtype`` on ``device`` (median)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        if i:  # the first call is a warm-up
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


# -- the machine -----------------------------------------------------------------------------------


def machine_info(device: torch.device | str) -> dict:
    """What the figures were measured on; ``load_avg`` shows whether something else was running."""
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu in (platform.processor(), platform.machine()):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": _faiss_threads(),
        "cpu_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "memory_gib": _total_memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "faiss": _version("faiss"),
        "numpy": _version("numpy"),
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if torch.device(device).type == "cuda" else None,
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return info


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001 - a missing optional module is reported as None
        return None


def _faiss_threads():
    try:
        import faiss

        return faiss.omp_get_max_threads()
    except ImportError:
        return None


def _total_memory_gib():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        return None


def _git(*cmd):
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# -- models ----------------------------------------------------------------------------------------


def make_model(args, device: torch.device, **config):
    """A LongMem model: ``--model DIR`` (with ``config`` overrides), else random weights of the default shape
    (the tiny quick shape with ``--quick``). Returns (model, shape description for the JSON)."""
    from longmem import LongMem, LongMemConfig

    if args.model:
        model = LongMem.from_pretrained(args.model, **config)
        desc = {"source": str(args.model)}
    else:
        import transformers

        name = getattr(args, "shape", None) or ("quick" if args.quick else "default")
        shape = SHAPES[name]
        torch.manual_seed(args.seed)
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=0))
        from longmem.config import default_memory_layer

        config.setdefault("memory_layer", default_memory_layer(shape["num_hidden_layers"]))
        model = LongMem.from_backbone(hf.eval(), LongMemConfig(**config))
        desc = {"source": f"random weights, {name} shape", **shape}
    model.to(device)
    bb = model.backbone
    desc.update(layers=bb.num_layers, sidenet_layers=model.sidenet.num_layers, hidden=bb.hidden_size,
                heads=bb.num_heads, kv_heads=bb.num_kv_heads, head_dim=bb.head_dim, vocab=bb.vocab_size,
                memory_layer=model.memory_layer,
                backbone_params=sum(p.numel() for p in bb.parameters()),
                sidenet_params=sum(p.numel() for p in model.trainable_parameters()))
    return model, desc


class LinearsFloor:
    """The floor under any decode loop: every ``nn.Linear`` of ``modules`` (each once: a tied LM head once) applied to
    B single-token rows, and nothing else; what the weights alone cost per decoded token."""

    def __init__(self, modules, batch: int, device):
        found = (m for part in modules for m in part.modules() if isinstance(m, torch.nn.Linear))
        self.linears = list({id(m): m for m in found}.values())
        self.inputs = [torch.randn(batch, 1, m.in_features, device=device, dtype=m.weight.dtype) for m in self.linears]
        self.weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in self.linears)

    @torch.no_grad()
    def token(self) -> None:
        for m, x in zip(self.linears, self.inputs):
            m(x)


def fill_memory(bank, tokens: int, seed: int = 0, piece: int = 65536) -> None:
    """Write ``tokens`` random tokens into every row of ``bank`` (in pieces, so peak memory stays low).

    Search cost does not depend on the key values (exact search scans everything), so random keys
    measure speed faithfully; recall of approximate indexes does depend on them (see retrieval.py).
    """
    g = torch.Generator().manual_seed(seed)
    B, H, Dh = bank.batch_size, bank.num_heads, bank.head_dim
    done = 0
    while done < tokens:
        n = min(piece, tokens - done)
        k = torch.randn(B, H, n, Dh, generator=g, dtype=torch.float32)
        v = torch.randn(B, H, n, Dh, generator=g, dtype=torch.float32)
        bank.add(k, v)
        done += n


def autocast_dtype(precision: str, device: torch.device):
    """The training loop's rule (longmem.training.train.autocast_dtype): auto = bf16 where the hardware has it."""
    from longmem.training.train import autocast_dtype as rule

    return rule(precision, device)


# -- results ---------------------------------------------------------------------------------------


def target(name: str, value: float, op: str, threshold: float, note: str = "") -> dict:
    """A target from the issue: ``value op threshold`` (op is "<=" or ">=")."""
    met = value <= threshold if op == "<=" else value >= threshold
    return {"name": name, "value": value, "op": op, "threshold": threshold, "met": bool(met), "note": note}


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
            return f"{x:.3g}"
        return f"{x:,.{digits}g}" if abs(x) >= 1 else f"{x:.{digits}g}"
    return str(x)


def table(rows: list[dict], columns: list[str], title: str | None = None) -> str:
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def finish(args, name: str, config: dict, results: list[dict], targets: list[dict], columns: list[str],
           started: float, extra: dict | None = None) -> dict:
    """Print the results table and the targets; write the JSON (schema: benchmarks/README.md)."""
    payload = {
        "benchmark": name,
        "mode": args.mode,
        "command": " ".join([f"python benchmarks/{name}.py"] + args.argv),
        "machine": {**machine_info(args.device), "load_avg_1m_start": getattr(args, "load_at_start", None),
                    "malloc": getattr(args, "malloc", None)},
        "config": config,
        "results": results,
        "targets": targets,
        **(extra or {}),
        "wall_s": time.perf_counter() - started,
    }
    print(table(results, columns, title=f"\n{name} ({args.mode} mode, {args.device}, {payload['machine']['cpu']}, "
                                           f"{payload['machine']['torch_threads']} threads, load {fmt(payload['machine']['load_avg_1m_start'], 2)} at start)"))
    if targets:
        print()
        print(table(targets, ["name", "value", "op", "threshold", "met", "note"], title="targets"))
    out = Path(args.json) if args.json else default_json(name, args.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2, default=_json_default) + "\n"))
    print(f"\nwrote {out}")
    return payload


def default_json(name: str, quick: bool) -> Path:
    """benchmarks/results/NAME.json (full mode) or benchmarks/results/quick/NAME.json (quick mode)."""
    return (RESULTS / "quick" if quick else RESULTS) / f"{name}.json"


def _json_default(x):
    if isinstance(x, torch.dtype):
        return str(x).removeprefix("torch.")
    if isinstance(x, (Path, torch.device)):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
