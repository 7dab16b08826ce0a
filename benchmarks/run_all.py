"""Run every benchmark (quick or full mode) and summarise their targets.

    python benchmarks/run_all.py --quick                       # all, seconds each (CI)
    python benchmarks/run_all.py                               # full mode: real figures (about 30-45 min on 2 cores)
    python benchmarks/run_all.py --update-md BENCHMARKS.md     # ... and rewrite the generated table in BENCHMARKS.md
    python benchmarks/run_all.py --summary-only --update-md BENCHMARKS.md   # table from existing JSON, no runs

Each script runs in its own process (so one's memory and threads never disturb the next) with the
flags given here (--device, --model, --threads, --repeats) and writes its JSON to the default place
(benchmarks/results/NAME.json, or results/quick/NAME.json in quick mode). The summary lists every
target of every benchmark with its value and whether it was met.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

BENCHMARKS = ["retrieval", "adaptation_step", "ingest", "generation", "footprint", "stream_rss", "scale", "harness_prefix"]
BEGIN, END = "<!-- run_all:begin -->", "<!-- run_all:end -->"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/run_all.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every benchmark in quick mode")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", help="a LongMem checkpoint folder passed to every benchmark (e.g. models/longmem-tiny)")
    p.add_argument("--threads", type=int, help="torch/faiss threads (default: all cores)")
    p.add_argument("--repeats", type=int, help="timed repeats (default: each script's)")
    p.add_argument("--summary-only", action="store_true", help="run nothing; summarise the existing JSON files")
    p.add_argument("--update-md", metavar="FILE", help=f"replace the text between {BEGIN} and {END} in FILE with the summary")
    args = p.parse_args(argv)
    names = args.only or BENCHMARKS
    failed = []
    if not args.summary_only:
        for name in names:
            cmd = [sys.executable, str(Path(__file__).resolve().parent / f"{name}.py")]
            cmd += ["--quick"] if args.quick else []
            cmd += ["--device", args.device]
            for flag in ("model", "threads", "repeats"):
                if getattr(args, flag) is not None:
                    cmd += [f"--{flag}", str(getattr(args, flag))]
            print(f"\n=== {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd)
            print(f"=== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
            if rc:
                failed.append(name)
    summary = summarize([common.default_json(n, args.quick) for n in names])
    print("\n" + summary)
    if args.update_md:
        update_markdown(Path(args.update_md), summary)
        print(f"updated {args.update_md}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def summarize(paths: list[Path]) -> str:
    """A markdown table of every target in the given result files (missing files are listed as such)."""
    lines = ["| benchmark | mode | target | value | wanted | met | note | machine, load, date |",
             "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        if not path.is_file():
            lines.append(f"| {path.stem} | - | no results ({path} missing) | | | | | |")
            continue
        res = json.loads(path.read_text())
        m = res["machine"]
        load = m.get("load_avg_1m_start")
        where = f"{m['cpu']}, {m['torch_threads']} thr, load {'?' if load is None else f'{load:.1f}'}, {m['date_utc'][:16]}"
        for t in res["targets"]:
            lines.append(f"| {res['benchmark']} | {res['mode']} | {t['name']} | {t['value']:.3g} | {t['op']} {t['threshold']:g} "
                         f"| {'yes' if t['met'] else '**no**'} | {t.get('note', '')} | {where} |")
    return "\n".join(lines)


def update_markdown(path: Path, summary: str) -> None:
    text = path.read_text() if path.is_file() else ""
    block = f"{BEGIN}\n{summary}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
