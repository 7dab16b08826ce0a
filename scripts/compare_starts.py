"""Compare SideNet starts on the same recall recipe and budget: held-out answer loss and exact answers by step.

Reads the ``metrics.jsonl`` of several ``longmem adapt`` runs (one folder per start, named after it) and writes
one plot of the held-out answer loss with and without memory, plus a JSON table of every held-out check.

    python scripts/compare_starts.py RUN_DIR... --out results/smollm2/starts
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longmem.io import write_json
from longmem.plots import plot_loss_curves


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="longmem adapt --out folders, one per start")
    p.add_argument("--out", type=Path, required=True, help="folder for starts.png and starts.json")
    args = p.parse_args(argv)
    table, checks = {}, {}
    for run in args.runs:
        state = json.loads((run / "state.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        held = [r for r in rows if "heldout_loss_memory" in r]
        name = f"{state['config']['sidenet_init']} ({state['config']['blocks']} blocks)"
        table[name] = {"trained_tensors": len(state["trained"]), "config": state["config"],
                       "heldout": [{k: r[k] for k in ("step", "alpha", "heldout_exact_memory", "heldout_exact_no_memory",
                                                    "heldout_loss_memory", "heldout_loss_no_memory")} for r in held]}
        checks[f"{name}, with memory"] = [(r["step"], r["heldout_loss_memory"]) for r in held]
        checks[f"{name}, without memory"] = [(r["step"], r["heldout_loss_no_memory"]) for r in held]
    args.out.mkdir(parents=True, exist_ok=True)
    plot_loss_curves(args.out / "starts.png", [], checks, xlabel="optimizer step",
                     title="Held-out answer loss by SideNet start, same recipe and steps")
    write_json(args.out / "starts.json", table)
    for name, t in table.items():
        last = t["heldout"][-1]
        best = min(t["heldout"], key=lambda r: r["heldout_loss_memory"])
        print(f"{name}: step {last['step']}: loss with memory {last['heldout_loss_memory']:.3f}, without "
              f"{last['heldout_loss_no_memory']:.3f}, exact {last['heldout_exact_memory']:.3f} / "
              f"{last['heldout_exact_no_memory']:.3f}; best with memory {best['heldout_loss_memory']:.3f} at step {best['step']}")
    return table


if __name__ == "__main__":
    main()
