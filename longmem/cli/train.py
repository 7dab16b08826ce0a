"""``longmem train``: memory-augmented adaptation (and the baselines), under torchrun."""

from __future__ import annotations

import argparse
import json
import os

from longmem.training.config import TrainConfig
from longmem.training.train import train


def _run(args: argparse.Namespace) -> int:
    cfg = TrainConfig.from_dict({k: v for k, v in vars(args).items() if k in TrainConfig.keys()})  # None: not given
    result = train(cfg, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "gate"}))
    return 0


def add_parser(sub) -> None:
    d = TrainConfig.from_dict({"data": ["x"]}).to_dict()  # the defaults, by flag
    p = sub.add_parser("train", help="memory-augmented adaptation: train a SideNet on a frozen backbone",
                       description="Train LongMem's SideNet on a frozen backbone (paper s3.4). Each batch row streams one "
                                   "document segment by segment with its own memory. Works under torchrun (DDP). "
                                   "Three choices differ from the official release: gradients are clipped at a global "
                                   "norm of 1.0 by default (--grad-clip); 1-D parameters (the gate, norms, biases) get "
                                   "no weight decay (fairseq decays all); the SideNet's dropout is the backbone's own, "
                                   "from its config (0.1 for GPT-2, none for Llama; the official SideNet uses 0.1 plus "
                                   "0.1 attention dropout).")
    p.add_argument("--backbone", default=d["backbone"], help="HF model folder or hub id (default: the shipped longmem-tiny backbone)")
    p.add_argument("--data", nargs="+", required=True, help="training documents: text files, folders, .jsonl, hf:NAME")
    p.add_argument("--val-data", dest="val_data", nargs="+", help="validation documents (loss with and without memory)")
    p.add_argument("--out", default=d["out"], help="output folder (loadable with LongMem.from_pretrained)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the backbone's)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly")
    for name, typ, help_ in (
        ("max-steps", int, "optimizer steps"), ("max-minutes", float, "stop (and checkpoint) after this wall time"),
        ("batch-size", int, "document streams per process"), ("grad-accum", int, "micro-batches per step"),
        ("segment-length", int, "local window T (default min(1024, backbone context))"),
        ("memory-size", int, "memory tokens per stream (FIFO)"), ("chunk-size", int, "tokens per memory chunk"),
        ("topk-chunks", int, "chunks retrieved per query"), ("memory-layer", int, "backbone block m to cache (odd)"),
        ("lr", float, "peak learning rate"), ("eps", float, "AdamW epsilon"),
        ("weight-decay", float, "AdamW weight decay, on matrices only (not on the gate, norms, biases)"),
        ("warmup-steps", int, "linear warmup steps"), ("grad-clip", float, "clip the global gradient norm to this"),
        ("eval-every", int, "validate every N steps (0: only at the end)"), ("eval-docs", int, "validation documents"),
        ("eval-segments", int, "segments per validation document"), ("save-every", int, "checkpoint every N steps"),
        ("seed", int, "random seed"),
    ):
        dest = name.replace("-", "_")
        default = d[dest]
        p.add_argument(f"--{name}", dest=dest, type=typ, default=None, help=f"{help_} (default: {default})")
    p.add_argument("--betas", nargs=2, type=float, default=None, help=f"AdamW betas (default: {d['betas']})")
    p.add_argument("--precision", choices=["auto", "bf16", "fp16", "fp32"], default=None, help="autocast precision (default: auto)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")
    p.add_argument("--method", choices=["longmem", "memtrm", "finetune"], default=None,
                   help="longmem (default): SideNet on a frozen backbone; memtrm: coupled memory in the trained "
                        "backbone (Memorizing-Transformer style); finetune: the backbone fine-tuned, no memory")
    p.add_argument("--train-layers", dest="train_layers", choices=["all", "upper"], default=None,
                   help="baselines: train all backbone blocks (default) or the upper half")
    p.add_argument("--retrieval-metric", dest="retrieval_metric", choices=["ip", "cosine"], default=None,
                   help="chunk search score: ip = inner product with the chunk-mean key (the paper, default); cosine = "
                        "with the unit-length chunk-mean key (a few large-norm keys cannot win every search)")
    p.add_argument("--retrieval-query", dest="retrieval_query", choices=["query", "key"], default=None,
                   help="what searches the memory: query = the memory layer's query projection (the paper, default); "
                        "key = the backbone's own block-m key of each token, the space the stored keys are in")
    p.add_argument("--retrieval-next", dest="retrieval_next", action=argparse.BooleanOptionalAction, default=None,
                   help="also attend to the chunk stored right after each retrieved one (not in the paper; K doubles): "
                        "with key search the token to copy is often the first of the next chunk; --no-retrieval-next "
                        "turns it off for a model --init-from one that has it (the shipped default does)")
    p.add_argument("--init-from", dest="init_from", default=None,
                   help="start the SideNet from this saved LongMem model (a run's OUT or models/longmem-tiny) instead of "
                        "the backbone's blocks; its memory settings are used")
    p.add_argument("--strategy", default=None,
                   help="how processes under torchrun share the work: ddp (default) replicates the model and averages "
                        "gradients; fsdp (FSDP2) shards the SideNet's parameters, gradients and optimizer state, for "
                        "SideNets too large to replicate. Multi-node: torchrun --nnodes N --node-rank K --master-addr HOST "
                        "--master-port PORT --nproc-per-node G -m longmem.cli train ... on every node")
    p.add_argument("--shard-backbone", dest="shard_backbone", action="store_true", default=None,
                   help="with --strategy fsdp: shard the frozen backbone too (default: a full copy per process)")
    p.add_argument("--grad-checkpointing", dest="grad_checkpointing", action="store_true", default=None,
                   help="recompute SideNet block activations in the backward pass (less memory, ~1/3 more compute)")
    p.add_argument("--lora-rank", dest="lora_rank", type=int, default=None,
                   help="train rank-R LoRA adapters (peft) on the SideNet blocks' linear layers instead of the layers "
                        "themselves; the gate and norms still train fully; the saved model holds merged weights "
                        "(default: off, the whole SideNet trains as in the paper)")
    p.add_argument("--lora-alpha", dest="lora_alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--dtype", default=None,
                   help="the frozen backbone's weights: fp32 (default) or bf16 (half the memory; the SideNet stays fp32 "
                        "under autocast)")
    p.add_argument("--staleness-every", dest="staleness_every", type=int, default=None,
                   help="every N steps, record how far stored keys drifted from what the current weights compute")
    p.set_defaults(func=_run)
