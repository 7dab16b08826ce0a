"""Scale plan: bytes per GPU to adapt LongMem on real backbones, under DDP, FSDP and LoRA, checked against
measured allocations at small shapes.

The real models are config dicts written here (no download) built on the meta device (no allocation),
so parameter counts are exact. For each model and strategy the plan counts, per GPU:

    backbone     frozen weights, bf16 (``--dtype bf16``); replicated, or / N with ``--shard-backbone``
    sidenet      fp32 weights of L/2 blocks + final norm + gate; / N under FSDP
    grads        fp32, of what trains (all SideNet weights, or LoRA adapters + norms + gate); / N under FSDP
    optimizer    AdamW exp_avg + exp_avg_sq, fp32 (8 bytes per trained parameter); / N under FSDP
    fsdp buffer  the largest unit all-gathered twice (prefetch) plus its unsharded gradient (FSDP only)
    weight copy  autocast's bf16 copy of each SideNet linear weight, kept for the backward pass: not sharded
                 under FSDP (FSDP2's MixedPrecisionPolicy would all-gather in bf16 instead; not used yet)
    activations  what autograd keeps for the backward pass, per token, times B x T tokens per GPU
                 (autocast bf16, SDPA attention; with --grad-checkpointing only each block's input is kept,
                 plus one block recomputed at a time and the memory layer, which is never recomputed)
    memory bank  keys + values (bf16) and chunk-mean keys (fp32) of M tokens per row, rows per GPU

Activation bytes per token per SideNet block (Llama family; D hidden, I MLP width, H/Hkv heads, Dh head dim):
two RMSNorms keep their fp32 input and output (16 D); autocast keeps a bf16 copy of the input of each of the
q/k/v/gate/up projections (10 D); attention keeps rotated q, k, v, its output and the merged output (6 D +
4 Hkv Dh); the SwiGLU MLP keeps gate, silu(gate), up and their product (8 I): 32 D + 8 I + 4 Hkv Dh.
Memory layer, extra: retrieved keys and values per query head (4 H K Dh), memory softmax (4 H K) and both
attention branches for the gate (4 D). Head: final norm and LM-head input (10 D), bf16 logits and fp32
log-softmax (6 V). Forward transient: the backbone's hidden states (L + 1) D in its dtype.

The check builds a real small LongMem on the CPU and measures parameter, gradient and optimizer bytes
(tensor sizes after a real step), activation bytes (distinct tensors autograd saves, via saved-tensor
hooks, under autocast bf16) and the memory bank's allocation, and reports each against the formula.

    python benchmarks/scale.py            # the plan + the check at longmem-tiny's shape (8 x 256)
    python benchmarks/scale.py --quick    # the plan + the check at a tiny shape (seconds)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402

GB = 1e9
GPU_BYTES = 80 * GB  # "80 GB" class GPU (A100/H100 80GB); no allowance here for the CUDA context or fragmentation

# Published configs (config.json of each model on the hub), the fields that size the network.
MODELS = {
    "Llama-3.2-1B": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         tie_word_embeddings=True, max_position_embeddings=131072),
    "Qwen3-4B": dict(model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     tie_word_embeddings=True, max_position_embeddings=40960),
    "Llama-3.1-8B": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         tie_word_embeddings=False, max_position_embeddings=131072),
}
SMALL = {  # the check's shapes (Llama family, GQA 2:1)
    "quick": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                  max_position_embeddings=512),
    "default": dict(model_type="llama", **common.DEFAULT_SHAPE, head_dim=32),
}
STRATEGIES = [("ddp", 1, False, None), ("fsdp", 2, False, None), ("fsdp", 4, False, None), ("fsdp", 8, False, None),
              ("fsdp", 8, True, None), ("ddp", 1, False, 16), ("fsdp", 8, True, 16)]


def build_parser():
    p = common.parser("scale", __doc__)
    p.add_argument("--rows", type=int, default=1, help="document streams (batch rows) per GPU (default 1)")
    p.add_argument("--tokens", type=int, default=1024, help="segment length T (default 1024, the paper's)")
    p.add_argument("--memory-size", type=int, default=65536, help="memory tokens per row (default 65536, the paper's)")
    p.add_argument("--topk-chunks", type=int, default=16)
    p.add_argument("--chunk-size", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=16, help="rank of the LoRA rows (default 16)")
    return p


# -- counting --------------------------------------------------------------------------------------


def meta_model(cfg: dict):
    """The HF causal LM of ``cfg`` on the meta device: shapes, no storage."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {k: v for k, v in cfg.items() if k != "model_type"}
    config = AutoConfig.for_model(cfg["model_type"], **kw, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def counts(hf, lora_rank: int) -> dict:
    """Parameter counts of the backbone, the SideNet (blocks 1, 3, 5, ... + final norm + gate), its largest FSDP
    unit, and what trains under LoRA (adapters on every linear layer of the blocks, plus norms and gate)."""
    from longmem.training.scale import linear_layer_names

    cfg = hf.config
    blocks = hf.model.layers
    side_blocks = [blocks[2 * i + 1] for i in range(len(blocks) // 2)]
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    sidenet = sum(n(b) for b in side_blocks) + n(hf.model.norm) + cfg.num_attention_heads
    units = [sum(p.numel() for p in m.parameters(recurse=False)) for b in side_blocks for m in b.modules()]
    lora, linear = 0, 0
    for b in side_blocks:
        for name in linear_layer_names(b):
            layer = b.get_submodule(name)
            lora += lora_rank * (layer.in_features + layer.out_features)
            linear += n(layer)
    return {"backbone": n(hf), "sidenet": sidenet, "largest_unit": max(units), "sidenet_linear": linear,
            "lora_trained": lora + (sidenet - linear), "sidenet_layers": len(side_blocks)}


def weight_copy_bytes(c: dict, checkpointing: bool) -> float:
    """Autocast's bf16 copies of the SideNet's linear weights, kept from the forward to the backward (with
    checkpointing only the memory layer's: the other blocks cast again when they are recomputed)."""
    return 2 * c["sidenet_linear"] / (c["sidenet_layers"] if checkpointing else 1)


def activation_bytes_per_token(cfg: dict, K: int, checkpointing: bool, backbone_bytes: int = 2) -> dict:
    """Bytes autograd keeps per token (see the module docstring), split by part."""
    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, Hkv, Dh, L = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], cfg["num_hidden_layers"]
    block = 32 * D + 8 * I + 4 * Hkv * Dh + 4 * H
    if cfg["model_type"] == "qwen3":  # q/k RMSNorms keep their fp32 input and output
        block += 8 * (H + Hkv) * Dh
    memory_extra = 4 * H * K * Dh + 4 * H * K + 4 * D
    head = 10 * D + 6 * V
    Ls = L // 2
    # with checkpointing: each recomputed block's fp32 input, the memory layer in full, and (in the backward
    # pass) one block recomputed at a time
    blocks = (4 * D * (Ls - 1) + block) if checkpointing else Ls * block
    recompute = block if checkpointing else 0
    states = (L + 1) * D * backbone_bytes
    return {"blocks": blocks, "recompute": recompute, "memory_layer": memory_extra, "head": head,
            "backbone_states": states, "total": blocks + recompute + memory_extra + head + states}


def memory_bytes_per_token(cfg: dict, chunk_size: int, value_bytes: int = 2) -> float:
    Hkv, Dh = cfg["num_key_value_heads"], cfg["head_dim"]
    return 2 * Hkv * Dh * value_bytes + 4 * Hkv * Dh / chunk_size  # keys + values, chunk-mean keys (fp32)


def plan(name: str, cfg: dict, strategy: str, gpus: int, shard_backbone: bool, lora_rank, args) -> dict:
    c = counts(meta_model(cfg), lora_rank or 0)
    trained = c["lora_trained"] if lora_rank else c["sidenet"]
    shard = gpus if strategy == "fsdp" else 1
    K = args.topk_chunks * args.chunk_size
    tokens = args.rows * args.tokens
    parts = {
        "backbone_gb": 2 * c["backbone"] / (gpus if shard_backbone else 1) / GB,
        "sidenet_gb": 4 * c["sidenet"] / shard / GB,
        "grads_gb": 4 * trained / shard / GB,
        "optimizer_gb": 8 * trained / shard / GB,
        "fsdp_buffer_gb": (12 * c["largest_unit"] / GB) if strategy == "fsdp" else 0.0,
        "weight_copies_gb": weight_copy_bytes(c, False) / GB,
        "memory_bank_gb": args.rows * args.memory_size * memory_bytes_per_token(cfg, args.chunk_size) / GB,
    }
    act = activation_bytes_per_token(cfg, K, checkpointing=False)
    act_ckpt = activation_bytes_per_token(cfg, K, checkpointing=True)
    parts["activations_gb"] = act["total"] * tokens / GB
    parts["activations_ckpt_gb"] = act_ckpt["total"] * tokens / GB
    ckpt_copies = weight_copy_bytes(c, True) / GB
    fixed = sum(v for k, v in parts.items() if not k.startswith("activations"))
    total = fixed + parts["activations_gb"]
    total_ckpt = fixed - parts["weight_copies_gb"] + ckpt_copies + parts["activations_ckpt_gb"]
    label = strategy + (f"-{gpus}" if strategy == "fsdp" else "") + (" +shard-backbone" if shard_backbone else "") + \
        (f" +lora{lora_rank}" if lora_rank else "")
    return {"model": name, "strategy": label, "gpus": gpus, "backbone_params": c["backbone"], "sidenet_params": c["sidenet"],
            "trained_params": trained, **{k: round(v, 3) for k, v in parts.items()},
            "act_bytes_per_token": act["total"], "act_ckpt_bytes_per_token": act_ckpt["total"],
            "total_gb": round(total, 2), "total_ckpt_gb": round(total_ckpt, 2),
            "fits_80gb": fits(total, total_ckpt)}


def fits(total: float, total_ckpt: float) -> str:
    """On one 80 GB GPU: "yes" under 90% (the CUDA context and fragmentation take some), "with ckpt" when only
    gradient checkpointing brings it under 90%, "tight" when it is under 80 GB only with checkpointing, else "no"."""
    room = 0.9 * GPU_BYTES / GB
    if total <= room:
        return "yes"
    if total_ckpt <= room:
        return "with ckpt"
    return "tight" if total_ckpt <= GPU_BYTES / GB else "no"


# -- the check -------------------------------------------------------------------------------------


def saved_bytes(fn, weight_shapes=frozenset()) -> tuple[int, int, object]:
    """(activation bytes, weight-copy bytes, fn()): the distinct storages autograd saves for the backward pass
    while ``fn()`` runs; parameters themselves are not counted, 2-D tensors of a parameter's shape (autocast's
    bf16 copies of weights) are counted apart."""
    acts, copies = {}, {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            s = t.untyped_storage()
            (copies if t.dim() == 2 and tuple(t.shape) in weight_shapes else acts)[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(acts.values()), sum(copies.values()), out


def check(args, shape: dict, device) -> list[dict]:
    """Formula against measurement at a small shape on the CPU."""
    import transformers

    from longmem import LongMem, LongMemConfig
    from longmem.model import next_token_loss
    from longmem.training.step import MicroBatch, train_step
    from longmem.training.config import OptimConfig
    from longmem.training.train import make_optimization

    kw = {k: v for k, v in shape.items() if k != "model_type"}
    torch.manual_seed(args.seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    B, T, M = 2, 48, 4096  # B x T = 96 tokens: no parameter has a dimension of 96 (see saved_bytes)
    cfg = LongMemConfig(chunk_size=args.chunk_size, topk_chunks=args.topk_chunks, memory_size=M, segment_length=T)
    model = LongMem.from_backbone(hf.eval(), cfg).to(device).train()
    c = counts(meta_model(shape), 0)
    rows = []

    def row(what, formula, measured):
        rows.append({"quantity": what, "formula": formula, "measured": measured,
                     "rel_error": abs(formula - measured) / measured})

    params = model.trainable_parameters()
    weight_shapes = frozenset(s for p in model.parameters() if p.dim() == 2 for s in (tuple(p.shape), tuple(p.shape)[::-1]))
    row("sidenet weights (bytes)", 4 * c["sidenet"], sum(p.numel() * p.element_size() for p in params))
    row("backbone weights, fp32 (bytes)", 4 * c["backbone"], sum(p.numel() * p.element_size() for p in model.backbone.model.parameters()))
    memory = model.new_memory(B, dtype=torch.bfloat16)
    common.fill_memory(memory, M, seed=args.seed)
    row("memory bank (bytes per token)", memory_bytes_per_token(shape, args.chunk_size), memory.nbytes() / (B * M))
    seq = torch.randint(0, shape["vocab_size"], (B, T + 1), generator=torch.Generator().manual_seed(args.seed))
    K = args.topk_chunks * args.chunk_size
    for ckpt in (False, True):
        model.sidenet.grad_checkpointing = ckpt

        def forward():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return model(seq[:, :-1], memory=memory, update_memory=False).logits

        measured, copies, logits = saved_bytes(forward, weight_shapes)
        measured += logits.numel() * logits.element_size()  # the step holds the bf16 logits until backward
        loss_saved, _, loss = saved_bytes(lambda: next_token_loss(logits, seq[:, 1:], shifted=True))
        measured += loss_saved
        loss.backward()
        model.zero_grad(set_to_none=True)
        want = activation_bytes_per_token(shape, K, ckpt, backbone_bytes=4)
        # kept from the forward to the backward: not the backbone's states (freed when the forward returns) nor
        # the block being recomputed (it exists in the backward pass only); the recomputed blocks' inputs are
        # held by the checkpoints, not saved through autograd, so the measurement misses those 4 D per block
        formula = want["total"] - want["backbone_states"] - want["recompute"]
        which = "with" if ckpt else "no"
        row(f"activations kept for backward, {which} checkpointing (bytes per token)", formula, measured / (B * T))
        # fp32 backbone here: its LM head is cast too (a bf16 backbone needs no copy)
        row(f"autocast weight copies, {which} checkpointing (bytes)",
            weight_copy_bytes(c, ckpt) + 2 * shape["vocab_size"] * shape["hidden_size"], copies)
    model.sidenet.grad_checkpointing = False
    optim = make_optimization(OptimConfig(), 10, params, torch.bfloat16)
    grads = {}
    optim.optimizer.register_step_pre_hook(lambda opt, a, k: grads.update(
        bytes=sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)))
    train_step(model, [MicroBatch(seq[:, :-1], seq[:, 1:])], optim, memory=memory)
    row("gradients (bytes)", 4 * c["sidenet"], grads["bytes"])
    state = sum(t.numel() * t.element_size() for s in optim.optimizer.state.values() for k, t in s.items() if k != "step")
    row("AdamW state (bytes)", 8 * c["sidenet"], state)
    return rows


def main(argv=None) -> dict:
    args = common.parse(build_parser(), argv)
    device = common.setup(args)
    started = time.perf_counter()
    rows = [plan(name, cfg, *s, args) for name, cfg in MODELS.items() for s in STRATEGIES
            for s in [s if s[3] is None else (*s[:3], args.lora_rank)]]
    agreement = check(args, SMALL["quick" if args.quick else "default"], torch.device("cpu"))
    print(common.table(agreement, ["quantity", "formula", "measured", "rel_error"],
                       title="\nformula vs measured (CPU, small shape)"))
    act = [r["rel_error"] for r in agreement if r["quantity"].startswith("activations")]
    exact = [r["rel_error"] for r in agreement if not r["quantity"].startswith("activations")]
    targets = [common.target("activation formula vs measured, worst relative error", max(act), "<=", 0.15),
               common.target("parameter/gradient/optimizer/memory formulas vs measured, worst", max(exact) + 1e-12, "<=", 1e-6)]
    config = {"rows_per_gpu": args.rows, "tokens": args.tokens, "memory_size_per_row": args.memory_size,
              "chunk_size": args.chunk_size, "topk_chunks": args.topk_chunks, "lora_rank": args.lora_rank,
              "backbone_dtype": "bf16", "sidenet_dtype": "fp32 (autocast bf16)", "gpu_bytes": GPU_BYTES,
              "check_shape": SMALL["quick" if args.quick else "default"]}
    return common.finish(args, "scale", config, rows,
                         targets, ["model", "strategy", "backbone_gb", "sidenet_gb", "grads_gb", "optimizer_gb",
                                   "activations_gb", "activations_ckpt_gb", "memory_bank_gb", "total_gb",
                                   "total_ckpt_gb", "fits_80gb"],
                         started, extra={"agreement": agreement})


if __name__ == "__main__":
    main()
