"""The frozen backbone: the only module that knows HuggingFace internals.

It runs an HF causal LM block by block (so that every hidden state and the keys/values of block m
are at hand, and so that the SideNet can run copies of the same blocks through the same code), and
it hides the differences between model families behind one small interface:

    embed(input_ids, positions)           -> Hb[0]                         (B, T, D)
    rotary(x, positions)                  -> whatever the family's attention needs for positions
    block_forward(block, x, rope, core)   -> the block's output; ``core`` does the attention itself
    logits(h)                             -> final norm + LM head          (B, T, V)

Glossary: B rows, T tokens, D hidden size, H query heads, Hkv key/value heads, Dh head dim, L layers.
``Hb[i]`` is the hidden state entering block i, ``Hb[L]`` the raw output of the last block (no final
norm).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from longmem.attention import causal_attention
from longmem.errors import LongMemError

# core(q, k, v, q_raw, k_raw) -> (B, H, T, Dh): the attention computation inside a block.
# q (B, H, T, Dh) and k (B, Hkv, T, Dh) carry the family's position scheme; q_raw and k_raw are the
# same projections before any rotary embedding (identical tensors for GPT-2); v is (B, Hkv, T, Dh).
AttentionCore = Callable[..., torch.Tensor]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    B, T, _ = x.shape
    return x.view(B, T, -1, head_dim).transpose(1, 2)  # (B, H, T, Dh)


def _merge(x: torch.Tensor) -> torch.Tensor:
    B, H, T, Dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * Dh)  # (B, T, D)


class _GPT2:
    """GPT-2 family: learned absolute positions, LayerNorm, fused Conv1D q/k/v (B, T, 3D)."""

    model_types = ("gpt2",)

    def __init__(self, model):
        cfg = model.config
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "add_cross_attention", False):
            raise LongMemError("GPT-2 backbones with scale_attn_by_inverse_layer_idx or cross-attention are not supported")
        self.num_heads = self.num_kv_heads = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.scale = self.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        self.max_positions = cfg.n_positions
        self.sliding_window = None

    def parts(self, model):
        t = model.transformer
        return t.h, t.ln_f, model.lm_head

    def embed(self, model, input_ids, positions):
        t = model.transformer
        return t.drop(t.wte(input_ids) + t.wpe(positions))

    def rotary(self, model, x, positions):
        return None  # positions were added at the embeddings

    def qkv(self, block, x, rope):
        q, k, v = block.attn.c_attn(x).split(x.shape[-1], dim=2)  # 3 x (B, T, D)
        q, k, v = (_heads(t, self.head_dim) for t in (q, k, v))  # (B, H, T, Dh)
        return q, k, v, q, k

    def block_forward(self, block, x, rope, core: AttentionCore):
        attn = block.attn
        x = x + attn.resid_dropout(attn.c_proj(_merge(core(*self.qkv(block, block.ln_1(x), rope)))))
        return x + block.mlp(block.ln_2(x))



class _Llama:
    """Llama family (also Mistral, Qwen2): RoPE applied inside attention, RMSNorm, GQA."""

    model_types = ("llama", "mistral", "qwen2")

    def __init__(self, model):
        cfg = model.config
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.max_positions = cfg.max_position_embeddings
        window = getattr(cfg, "sliding_window", None)
        uses_window = getattr(cfg, "use_sliding_window", True) and window
        self.sliding_window = int(window) if uses_window else None

    def parts(self, model):
        m = model.model
        return m.layers, m.norm, model.lm_head

    def embed(self, model, input_ids, positions):
        return model.model.embed_tokens(input_ids)

    def rotary(self, model, x, positions):
        return model.model.rotary_emb(x, positions.expand(x.shape[0], -1))  # (cos, sin): (B, T, Dh)

    def qkv(self, block, x, rope):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        a = block.self_attn
        q = _heads(a.q_proj(x), self.head_dim)  # (B, H, T, Dh)
        k = _heads(a.k_proj(x), self.head_dim)  # (B, Hkv, T, Dh), before rotary: position-free
        v = _heads(a.v_proj(x), self.head_dim)
        q_rot, k_rot = apply_rotary_pos_emb(q, k, *rope)
        return q_rot, k_rot, v, q, k

    def block_forward(self, block, x, rope, core: AttentionCore):
        qkv = self.qkv(block, block.input_layernorm(x), rope)
        x = x + block.self_attn.o_proj(_merge(core(*qkv)))
        return x + block.mlp(block.post_attention_layernorm(x))



_FAMILIES = {t: fam for fam in (_GPT2, _Llama) for t in fam.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILIES))


@dataclass
class BackboneOutput:
    hidden_states: list[torch.Tensor]  # Hb[0..L], each (B, T, D); Hb[L] without the final norm
    keys: torch.Tensor  # (B, Hkv, T, Dh) block-m keys before any rotary embedding
    values: torch.Tensor  # (B, Hkv, T, Dh)


def load_causal_lm(model_or_path, dtype: torch.dtype | None = None) -> nn.Module:
    """An HF causal LM from an instance, a local folder or a hub id, with clear errors offline."""
    if isinstance(model_or_path, nn.Module):
        return model_or_path
    name = str(model_or_path)
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise LongMemError(
            f"cannot load backbone {name!r}: not a local model folder, and the hub is unreachable or has no such "
            f"model ({type(e).__name__}). Pass a folder saved with save_pretrained, or connect to the internet."
        ) from None
    if config.model_type not in _FAMILIES:
        raise LongMemError(_unsupported(config.model_type))
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise LongMemError(f"cannot load backbone weights from {name!r}: {str(e).splitlines()[0]}") from None


def linear_layer_names(module: nn.Module) -> list[str]:
    """Names of the linear projections inside ``module``: ``nn.Linear``, and GPT-2's ``Conv1D`` (a linear
    layer that stores its weight as (in, out))."""
    return [name for name, m in module.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _unsupported(model_type: str) -> str:
    return (
        f"backbone type {model_type!r} is not supported; supported causal LM families: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)}"
    )


class Backbone(nn.Module):
    """An HF causal LM run block by block. Frozen (the LongMem case): eval mode and no grads, always.

    ``frozen=False`` serves the baselines that train the backbone itself (MemTRM, fine-tuning).
    """

    def __init__(self, model: nn.Module, frozen: bool = True):
        super().__init__()
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in _FAMILIES:
            raise LongMemError(_unsupported(model_type) if model_type else f"{type(model).__name__} is not an HF model")
        if getattr(model, "get_output_embeddings", lambda: None)() is None:
            raise LongMemError(
                f"{type(model).__name__} is not a causal LM (it has no LM head); "
                f"load it with AutoModelForCausalLM (e.g. GPT2LMHeadModel, LlamaForCausalLM)"
            )
        self.family = _FAMILIES[model_type](model)
        self.frozen = frozen
        self.model = model.eval().requires_grad_(False) if frozen else model
        self.blocks, self.norm, self.lm_head = self.family.parts(model)
        self.num_layers = len(self.blocks)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.hidden_size = model.get_input_embeddings().embedding_dim
        self.num_heads = self.family.num_heads
        self.num_kv_heads = self.family.num_kv_heads
        self.head_dim = self.family.head_dim
        self.scale = self.family.scale
        self.max_positions = self.family.max_positions
        self.sliding_window = self.family.sliding_window
        self._fingerprint = None

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)  # frozen: dropout stays off whatever the caller asks

    @property
    def name(self) -> str:
        return str(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    # -- the family interface, used by the SideNet too --------------------------------------------

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.family.embed(self.model, input_ids, positions)

    def rotary(self, x: torch.Tensor, positions: torch.Tensor):
        return self.family.rotary(self.model, x, positions)

    def block_forward(self, block: nn.Module, x: torch.Tensor, rope, core: AttentionCore) -> torch.Tensor:
        return self.family.block_forward(block, x, rope, core)

    def logits(self, h: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """LM head over a final norm (the backbone's, or the SideNet's own trainable copy)."""
        h = (norm or self.norm)(h)
        return self.lm_head(h.to(self.lm_head.weight.dtype))  # a SideNet may run in another dtype than the head

    def local_core(self) -> AttentionCore:
        scale = self.scale
        return lambda q, k, v, q_raw, k_raw: causal_attention(q, k, v, scale=scale)

    # -- the frozen forward ----------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, memory_layer: int, positions: torch.Tensor | None = None,
                cache=None, upto: int | None = None, memory_core: AttentionCore | None = None) -> BackboneOutput:
        """Run one segment. Returns all hidden states and block m's keys/values (pre-rotary).

        Args:
            input_ids: (B, T) token ids.
            memory_layer: m, the block whose keys/values go to memory.
            positions: (T,) or (1, T) position ids; default 0..T-1 (after the cached tokens, if any).
            cache: a ``KVCache`` holding the window's earlier tokens (incremental decoding), updated in place.
            upto: stop after this block (e.g. m, when only the memory's keys/values are wanted).
            memory_core: attention for block m instead of plain causal attention (the coupled-memory
                baseline puts joint attention there).
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self._forward(input_ids, memory_layer, positions, cache, upto, memory_core)

    def _forward(self, input_ids, memory_layer, positions, cache, upto, memory_core) -> BackboneOutput:
        T = input_ids.shape[1]
        if positions is None:
            start = len(cache) if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device)
        positions = positions.view(1, -1)
        h = self.embed(input_ids, positions)
        rope = self.rotary(h, positions)
        hidden, saved = [h], {}
        scale = self.scale

        def core_for(i):
            def core(q, k, v, q_raw, k_raw):
                if i == memory_layer:
                    saved["kv"] = (k_raw, v)  # pre-rotary keys: position-free, like the paper's ALiBi keys
                if cache is not None:
                    k, v = cache.update(i, k, v, k_raw if i == memory_layer else None)
                if i == memory_layer and memory_core is not None:
                    return memory_core(q, k, v, q_raw, k_raw)
                return causal_attention(q, k, v, scale=scale)

            return core

        blocks = self.blocks if upto is None else self.blocks[: upto + 1]
        for i, block in enumerate(blocks):
            h = self.block_forward(block, h, rope, core_for(i))
            hidden.append(h)
        keys, values = saved["kv"]
        return BackboneOutput(hidden_states=hidden, keys=keys, values=values)

    # -- identity ----------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        """A short hash that changes with the architecture or any weight (sampled, so it is cheap)."""
        if self._fingerprint is None:
            cfg = self.model.config.to_dict()
            keep = {k: cfg.get(k) for k in sorted(cfg) if not k.startswith("_") and k not in ("transformers_version", "dtype", "torch_dtype", "architectures", "name_or_path")}
            h = hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode())
            for name, p in sorted(self.model.state_dict().items()):
                flat = p.detach().reshape(-1)
                stride = max(1, flat.numel() // 4096)
                sample = flat[::stride].to(torch.float32).cpu().numpy()
                h.update(name.encode())
                h.update(str(tuple(p.shape)).encode())
                h.update(sample.tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint
