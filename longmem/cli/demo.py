"""``longmem demo``: the shipped default on a held-out document, with and without memory."""

from __future__ import annotations

from longmem.eval.demo import format_report, run_demo


def _run(args) -> int:
    report = run_demo(args.model, args.data, args.max_tokens, args.json, progress=not args.no_progress, names=args.names)
    print(format_report(report))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="show LongMem's memory at work on a held-out long document",
                       description="Stream a held-out long document through the shipped default model and print perplexity "
                                   "with memory, without memory (same weights) and with the frozen backbone alone; then "
                                   "ask for a pass key planted near its start, with the document in memory and without (greedy); with --names, "
                                   "put its first half in a memory and see whether the model completes names defined "
                                   "there when they are used in the second half.")
    p.add_argument("--model", help="LongMem checkpoint folder (default: the shipped default, longmem-tiny; or a shipped model's name, e.g. smollm2-135m-longmem)")
    p.add_argument("--data", help="document to read (default: the longest test-split file of the stdlib code corpus)")
    p.add_argument("--max-tokens", type=int, default=4096, help="read at most this many tokens (default: 4096)")
    p.add_argument("--names", action="store_true", help="also probe names defined in the first half, completed in the "
                                                         "second (generation; slow on a large model)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run)
