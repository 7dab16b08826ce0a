"""``longmem staleness``: stored-vs-fresh key similarity by age, for training runs."""

from __future__ import annotations

from pathlib import Path

from longmem.errors import LongMemError
from longmem.staleness import plot_staleness, staleness_curve
from longmem.io import CONFIG_FILE, check_output, read_checkpoint_meta, write_result


def _run_staleness(args) -> int:
    check_output(args.json)
    check_output(args.plot, "--plot")
    curves = {}
    for run in args.run:
        path = Path(run) / "metrics.jsonl"
        if not path.is_file():
            raise LongMemError(f"{run} has no metrics.jsonl; give the --out folder of a `longmem train` run")
        meta = read_checkpoint_meta(Path(run)) if (Path(run) / CONFIG_FILE).is_file() else {}
        curve = staleness_curve(path)
        if not curve:
            raise LongMemError(f"{run} recorded no staleness; train it with --staleness-every N")
        curves[f"{meta.get('method', 'run')}:{Path(run).name}"] = curve
    for name, curve in curves.items():
        print(f"{name}: " + ", ".join(f"age {a}: {c:.4f}" for a, c in list(curve.items())[:12]))
    if args.json:
        write_result(args.json, {k: {str(a): c for a, c in v.items()} for k, v in curves.items()})
    if args.plot:
        plot_staleness(curves, args.plot)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("staleness", help="plot stored-vs-fresh key similarity by age for training runs",
                       description="Read the staleness records of `longmem train --staleness-every N` runs (e.g. one "
                                   "--method memtrm and one --method longmem) and report similarity by memory age.")
    p.add_argument("--run", nargs="+", required=True, help="training output folders")
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--json", help="write the curves here")
    p.set_defaults(func=_run_staleness)
