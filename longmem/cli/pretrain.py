"""``longmem pretrain``, ``export-backbone`` and ``perplexity``: the small backbone trained from scratch."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from longmem.io import check_output, write_result
from longmem.training.pretrain import PretrainConfig, export_backbone, perplexity, pretrain

# --------------------------------------------------------------------------- CLI


def _run_pretrain(args: argparse.Namespace) -> int:
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    final = pretrain(cfg, progress=args.progress)
    print(json.dumps(final))
    print(f"model + tokenizer -> {cfg.out}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    info = export_backbone(args.run, args.out)
    print(f"step {info['step']} ({info['tokens']:,} tokens, {info['seconds'] / 60:.1f} min) "
          f"-> {args.out}")
    return 0


def _run_perplexity(args: argparse.Namespace) -> int:
    check_output(args.json)
    results = perplexity(args.model, args.data, args.seq_len, args.max_tokens, args.precision)
    for name, r in results.items():
        print(f"{name}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  ({r['tokens']} tokens)")
    if args.json:
        write_result(args.json, results)  # with longmem_version, format_version and sha256 (see longmem.io)
    return 0


def add_parser(sub) -> None:
    d = PretrainConfig.__dataclass_fields__
    p = sub.add_parser(
        "pretrain", help="train a small Llama-style backbone from scratch (CPU or GPU)",
        description="Train a LlamaForCausalLM (RoPE, RMSNorm, GQA, SwiGLU, tied embeddings) on "
        "random windows of the training documents; save it with its tokenizer in OUT "
        "(safetensors), with OUT/metrics.jsonl, OUT/loss.png and a resumable OUT/checkpoint/.",
    )
    p.add_argument("--data", nargs="+", required=True,
                   help="training sets (text files, folders, .jsonl, hf:NAME[:SPLIT]); each "
                   "batch row samples one set uniformly (or by --weights)")
    p.add_argument("--val-data", nargs="*", default=None,
                   help="validation sets (default: validation.jsonl next to each train.jsonl)")
    p.add_argument("--tokenizer", required=True, help="tokenizer folder (longmem tokenizer)")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("model shape")
    for name, help_ in (("layers", "decoder layers"), ("hidden", "hidden size"),
                        ("heads", "attention heads"), ("kv_heads", "key/value heads (GQA)"),
                        ("intermediate", "MLP (SwiGLU) size"), ("seq_len", "training window"),
                        ("max_position", "max_position_embeddings")):
        g.add_argument(f"--{name.replace('_', '-')}", type=int, default=d[name].default,
                       help=f"{help_} (default: {d[name].default})")
    g.add_argument("--rope-theta", type=float, default=d["rope_theta"].default,
                   help=f"RoPE base (default: {d['rope_theta'].default})")
    o = p.add_argument_group("optimisation")
    for name, typ, help_ in (
        ("batch_size", int, "sequences per step"), ("lr", float, "peak learning rate"),
        ("min_lr_ratio", float, "final lr as a fraction of --lr"),
        ("warmup", int, "linear warmup steps"), ("weight_decay", float, "AdamW weight decay"),
        ("grad_clip", float, "gradient-norm clip"), ("max_steps", int, "training steps "
         "(the cosine schedule ends here)"), ("seed", int, "seed of init and sampling"),
        ("eval_every", int, "steps between validation losses"),
        ("eval_tokens", int, "tokens per validation set"),
        ("save_every", int, "steps between checkpoints"), ("log_every", int, "steps between "
         "metrics records"),
    ):
        o.add_argument(f"--{name.replace('_', '-')}", type=typ, default=d[name].default,
                       help=f"{help_} (default: {d[name].default})")
    o.add_argument("--max-minutes", type=float, default=None,
                   help="wall-time budget of this run; stops cleanly, checkpoints and saves")
    o.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                   help="bf16 autocast (default; ~2x faster on CPUs with avx512_bf16) or fp32")
    o.add_argument("--device", default="auto",
                   help="auto (default: cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N")
    o.add_argument("--weights", type=float, nargs="+", default=None,
                   help="sampling weight of each --data set, in order (default: each set equally often)")
    o.add_argument("--init-from", default=None,
                   help="continue from the weights of this model folder (same shape; e.g. a shipped backbone) "
                        "with a fresh optimizer and schedule")
    o.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint/ exactly where it stopped")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.set_defaults(func=_run_pretrain)

    e = sub.add_parser(
        "export-backbone", help="write a pretrain run's latest weights as a clean model folder",
        description="Copy the weights of RUN/checkpoint/state.pt (final once the run ended) with "
        "config and tokenizer into OUT (safetensors; no optimizer state), plus the run's "
        "metrics and loss curve. Works on a run that is still going (last checkpoint).",
    )
    e.add_argument("--run", required=True, help="the --out folder of `longmem pretrain`")
    e.add_argument("--out", required=True, help="destination model folder")
    e.set_defaults(func=_run_export)

    q = sub.add_parser(
        "perplexity", help="loss and perplexity of a causal LM folder on documents",
        description="Mean next-token loss over non-overlapping windows of each data set "
        "(documents joined with <|endoftext|>), and its exponential (perplexity).",
    )
    q.add_argument("--model", required=True, help="model + tokenizer folder")
    q.add_argument("--data", nargs="+", required=True, help="evaluation sets")
    q.add_argument("--seq-len", type=int, default=512, help="window length (default: 512)")
    q.add_argument("--max-tokens", type=int, default=None,
                   help="at most this many tokens per set (default: all)")
    q.add_argument("--precision", choices=["bf16", "fp32"], default="fp32",
                   help="fp32 (default) or bf16 autocast")
    q.add_argument("--json", default=None, help="also write the results to this JSON file")
    q.set_defaults(func=_run_perplexity)
