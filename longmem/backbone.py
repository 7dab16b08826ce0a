"""The frozen backbone: the only module that knows HuggingFace internals.

One adapter for every family: the HF model runs its own forward (embeddings, position scheme,
decoder layers, per-family details all come from transformers), and LongMem swaps only the
attention computation. transformers' attention-function registry makes that generic: the model is
switched to ``attn_implementation="longmem"``, a function registered under that name, which each
attention module calls with its rotated (B, H, T, Dh) queries and (B, Hkv, T, Dh) keys/values.

The dispatch, explicitly: every call of a decoder layer that LongMem makes carries a keyword argument
``longmem_call`` (a ``_Call``: the layer's attention *core* and, where asked for, its pre-rotary q/k);
transformers passes a layer's keyword arguments down to its attention function, which hands q, k, v to
that core (plain causal attention, the cache, or joint attention with the memory). A layer called
without it (someone calls the HF model directly) computes the family's own eager attention. The SideNet
passes ``longmem_call`` itself (``block_forward``); for the backbone's own layers, which HF's forward
calls, a forward pre-hook adds it. Those hooks, and one that records each layer's output, are installed
for one pass (``_run``) and removed when it ends: nothing stays on the caller's model. A pass belongs to
the thread that runs it: the hooks of a pass in another thread (the server runs requests side by side)
leave this thread's layer calls alone. The registration
of the attention function under ``"longmem"`` (``_register``) is the single global registration: it is
how transformers finds an attention function. Two exceptions leave HF's forward early, since its loop
over layers has no exit: ``_Stop`` after block ``upto`` and ``_Captured`` in the pre-rotary pass below.

The pass records every hidden state and the arguments each layer was called with, so that the SideNet
can run copies of the same layers with the same positions through the same code:

    forward(input_ids, m)                     -> Hb[0..L], block m's pre-rotary keys/values, layer inputs
    block_forward(block, x, inputs, core)     -> the block's output; ``core`` does the attention itself
    logits(h)                                 -> final norm + LM head (+ the family's logit scaling)

Pre-rotary queries/keys (what the memory stores and searches with, paper section 3.2): the layer
is run once more with an identity rotation (cos = a, sin = 0, exact in floating point), and the
attention function receives exactly the family's q/k projections after its q/k norms and before any
rotary, whatever the layout (fused q/k/v, partial or interleaved rotary). ``a`` is the rotation's
own magnitude, sqrt(cos^2 + sin^2), read at position 0 in the probe pass: 1 for plain rotary, the
attention factor that scaled rotary (YaRN, LongRoPE) puts on cos and sin, so that a query meets a
key in memory at the scale it meets the same key locally. That extra pass stops at
the attention function (no output projection, no MLP) and runs only for the layers that need it
(block m; the SideNet's memory layer). Families without rotary (learned or no positions) skip it.

Masks: the cores build their own causal mask (they know the KV cache) with the layer's sliding window
(passed to the attention function by transformers, or taken from the config when a family keeps it
only in its mask) and Gemma 2's score soft-cap; transformers' own masks go unused. LongMem hands HF's forward
a mask of zeros, which transformers passes through as-is; the probe refuses a family whose attention function
receives anything else at a visible position (Doge's dynamic mask adds a learned per-head bias there).

Glossary: B rows, T tokens, D hidden size, H query heads, Hkv key/value heads, Dh head dim, L layers.
``Hb[i]`` is the hidden state entering block i, ``Hb[L]`` the raw output of the last block (no final
norm).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from longmem.attention import causal_attention
from longmem.dtypes import parse_dtype
from longmem.errors import LongMemError
from longmem.gguf import gguf_folder, is_gguf

ATTN_NAME = "longmem"  # the name under which LongMem's attention function is registered in transformers

# core(q, k, v, q_raw, k_raw, **local) -> (B, H, T, Dh): the attention computation inside a block.
# q (B, H, T, Dh) and k (B, Hkv, T, Dh) carry the family's position scheme; q_raw and k_raw are the
# same projections before any rotary embedding (None where the caller did not ask for them; the same
# tensors as q, k for families without rotary); v is (B, Hkv, T, Dh). ``local`` holds the layer's
# own attention settings for ``causal_attention``: scale, window (sliding window), softcap.
AttentionCore = Callable[..., torch.Tensor]

# the final logits' post-processing of causal-LM heads, by config attribute (transformers applies it in
# ``ForCausalLM.forward``, which LongMem does not call)
_LOGIT_SOFTCAP = "final_logit_softcapping"  # gemma2/3: tanh(z / c) * c
_LOGIT_DIVIDE = "logits_scaling"  # granite: z / s
_LOGIT_MULTIPLY = "logit_scale"  # cohere: z * s
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f", "final_norm", "layer_norm")
_UNSUPPORTED_HINT = "LongMem needs a decoder-only causal LM whose attention modules call transformers' attention-function registry"


@dataclass
class LayerInputs:
    """What a decoder layer was called with besides its hidden state (positions, masks, ...)."""

    args: tuple
    kwargs: dict
    rotary_scale: torch.Tensor | None = None  # the rotation's magnitude at position 0, per rotary dim (see _identity_rotation)

    @property
    def rotary(self) -> bool:
        return self.kwargs.get("position_embeddings") is not None


@dataclass
class BackboneOutput:
    hidden_states: list[torch.Tensor]  # Hb[0..L], each (B, T, D); Hb[L] without the final norm
    keys: torch.Tensor  # (B, Hkv, T, Dh) block-m keys before any rotary embedding
    values: torch.Tensor  # (B, Hkv, T, Dh)
    layer_inputs: list[LayerInputs] = field(default_factory=list)  # per block: its positions etc. (for the SideNet)


# -- the attention function and what each layer call passes it -----------------------------------


@dataclass
class _Call:
    """The attention of the layer now running: its core and, where asked for, its pre-rotary q/k."""

    core: AttentionCore | None  # None: capture q/k and stop the layer (the identity-rotation pass)
    raw: tuple | None = None  # (q_raw, k_raw)
    window: int | None = None  # a sliding window the family keeps only in its mask (not passed to attention)
    masks: list | None = None  # where given (the probe), the attention masks the family passes are appended here
    calls: int = 0


class _Captured(Exception):
    def __init__(self, q, k):
        self.q, self.k = q, k


class _Stop(Exception):
    """Ends a backbone pass early (``upto``)."""


CALL_KEY = "longmem_call"  # the keyword argument that carries a layer's ``_Call`` down to the attention function


class _Pass:
    """One backbone forward: its hooks record Hb[i] and each layer's inputs and give each layer its ``_Call``.

    ``with _Pass(...)`` installs the hooks on the layers for the pass and removes them after it."""

    def __init__(self, layers, core_for, raw_layers, upto, window=None, rotary_scales=None, masks=None):
        self.layers = layers
        self.window = window
        self.masks = masks  # a list to collect each layer's attention mask in (the probe), or None
        self.rotary_scales = rotary_scales  # per layer: the magnitude of its rotation (None in the probe pass)
        self.core_for, self.raw_layers, self.upto = core_for, raw_layers, upto
        self.hidden: list[torch.Tensor] = []
        self.inputs: list[LayerInputs] = []
        self.last = None
        self._handles = []
        self._thread = threading.get_ident()  # the thread whose layer calls this pass sees

    def __enter__(self) -> "_Pass":
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._before(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._after, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _before(self, i: int):
        # ``kwargs=None``: another thread's forward can meet this hook while it is being registered, before torch
        # records that it takes keyword arguments, and call it without them; such a call is never this pass's
        def hook(layer, args, kwargs=None):
            if kwargs is None or CALL_KEY in kwargs or threading.get_ident() != self._thread:
                return None  # a call that brings its own (the pre-rotary pass below), or another thread's pass
            if self.upto is not None and i > self.upto:
                raise _Stop
            x = args[0] if args else kwargs["hidden_states"]
            inputs = LayerInputs(tuple(args[1:]), {k: v for k, v in kwargs.items() if k != "hidden_states"},
                                 self.rotary_scales[i] if self.rotary_scales is not None else None)
            self.hidden.append(x)  # Hb[i]
            self.inputs.append(inputs)
            raw = _pre_rotary(layer, x, inputs) if i in self.raw_layers else None
            return args, {**kwargs, CALL_KEY: _Call(self.core_for(i), raw, self.window, self.masks)}

        return hook

    def _after(self, layer, args, kwargs, output=None):  # output=None: called mid-registration by another thread
        if threading.get_ident() != self._thread:
            return None
        self.last = output[0] if isinstance(output, tuple) else output
        return None


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls as ``attn_implementation="longmem"``: (B, T, H, Dh), None.

    A layer called without a ``longmem_call`` (someone calls the HF model directly) gets the family's own eager
    attention.
    """
    call = kwargs.pop(CALL_KEY, None)
    if call is None:
        eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if eager is None:
            from transformers.integrations.sdpa_attention import sdpa_attention_forward as eager
        return eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if call.core is None:
        raise _Captured(query, key)
    if call.masks is not None:
        call.masks.append(attention_mask)
    call.calls += 1
    if call.calls > 1:
        raise LongMemError(f"{type(module).__name__} calls attention twice in one layer (cross-attention?); {_UNSUPPORTED_HINT}")
    if kwargs.get("s_aux") is not None:
        raise LongMemError(f"{type(module).__name__} uses attention sinks (s_aux), which LongMem's attention does not implement")
    local = {"scale": query.shape[-1] ** -0.5 if scaling is None else scaling,
             "window": kwargs.get("sliding_window") or call.window, "softcap": kwargs.get("softcap")}
    q_raw, k_raw = call.raw if call.raw is not None else (query, key)
    out = call.core(query, key, value, q_raw, k_raw, **local)  # (B, H, T, Dh)
    return out.transpose(1, 2), None  # (B, T, H, Dh), as transformers expects


def _adds_nothing(mask) -> bool:
    """Whether an attention mask leaves every causally visible score as it is: None, or 0 (True for a boolean mask)
    at each query's own and earlier keys. LongMem passes zeros and its cores mask causally; a family that puts
    something else there (a bias, a mask hiding visible keys) computes attention the cores do not."""
    if mask is None:
        return True
    Tq, Tk = mask.shape[-2:]
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=mask.device).tril(Tk - Tq)  # (Tq, Tk) key <= query
    seen = mask[..., visible]
    return bool(seen.all()) if mask.dtype == torch.bool else bool((seen == 0).all())


def _rotation_scale(pe) -> torch.Tensor:
    """(Dr,) the magnitude sqrt(cos^2 + sin^2) of a rotation at its first position, taken at position 0 (where
    sin = 0, so the magnitude is exactly |cos|): 1 for plain rotary, the attention factor of YaRN / LongRoPE."""
    if isinstance(pe, (tuple, list)) and len(pe) == 2:  # (cos, sin), each (B, T, Dr)
        return pe[0][0, 0].abs()
    if isinstance(pe, torch.Tensor) and pe.is_complex():  # freqs_cis (Llama 4), (B, T, Dr) or (T, Dr)
        return pe.reshape(-1, pe.shape[-1])[0].abs()
    raise LongMemError(f"unknown rotary embedding format {type(pe).__name__}; {_UNSUPPORTED_HINT}")


def _identity_rotation(pe, scale: torch.Tensor | None):
    """A rotation by angle 0 with the magnitude ``scale`` (None: 1) of the family's own rotation: exact."""
    if isinstance(pe, (tuple, list)) and len(pe) == 2:  # (cos, sin)
        ones = torch.ones_like(pe[0])
        return (ones if scale is None else ones * scale.to(ones)), torch.zeros_like(pe[1])
    if isinstance(pe, torch.Tensor) and pe.is_complex():  # freqs_cis (Llama 4)
        ones = torch.ones_like(pe)
        return ones if scale is None else ones * scale.to(ones)
    raise LongMemError(f"unknown rotary embedding format {type(pe).__name__}; {_UNSUPPORTED_HINT}")


def _pre_rotary(layer, x, inputs: LayerInputs):
    """(q_raw (B, H, T, Dh), k_raw (B, Hkv, T, Dh)): the layer's q/k with an identity rotation (exact)."""
    if not inputs.rotary:
        return None  # no rotary: the attention function's q/k are already position-free projections
    kwargs = {**inputs.kwargs, "position_embeddings": _identity_rotation(inputs.kwargs["position_embeddings"], inputs.rotary_scale)}
    try:
        layer(x, *inputs.args, **kwargs, **{CALL_KEY: _Call(None)})
    except _Captured as c:
        return c.q, c.k
    raise LongMemError(f"{type(layer).__name__} never called the attention function; {_UNSUPPORTED_HINT}")


def _is_causal_lm(model: nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in ((v,) if isinstance(v, str) else v)}
    return any(cls.__name__ in names for cls in type(model).__mro__)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_NAME, _attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)  # masks as for eager (used only outside LongMem)


# -- loading -------------------------------------------------------------------------------------


def load_causal_lm(model_or_path, dtype: torch.dtype | None = None) -> nn.Module:
    """An HF causal LM from an instance, a local folder or a hub id, with clear errors offline.

    ``dtype`` (e.g. torch.bfloat16) loads the weights in that type; an instance is converted in place.
    """
    dtype = parse_dtype(dtype)
    if isinstance(model_or_path, nn.Module):
        return to_dtype(model_or_path, dtype) if dtype is not None else model_or_path
    from transformers import AutoConfig, AutoModelForCausalLM

    name = str(model_or_path)
    if is_gguf(name):
        name = str(gguf_folder(name))  # converted once into the user's cache
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise LongMemError(
            f"cannot load backbone {name!r}: not a local model folder, and the hub is unreachable or has no such "
            f"model ({type(e).__name__}). Pass a folder saved with save_pretrained, or connect to the internet."
        ) from None
    check_config(config)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
    except (OSError, ValueError) as e:
        raise LongMemError(f"cannot load backbone weights from {name!r}: {str(e).splitlines()[0]}") from None


def to_dtype(module: nn.Module, dtype) -> nn.Module:
    """Convert a loaded model (an HF model, a Backbone, a LongMem) to ``dtype`` in place, exactly as
    ``from_pretrained(dtype=...)`` loads it: parameters and saved buffers converted, the buffers a model computes
    for itself (non-persistent: the rotary frequencies ``inv_freq``) kept as computed (fp32). ``module.to(dtype)``
    would round the rotary frequencies too, and the two ways to a bf16 model would give different logits."""
    dtype = parse_dtype(dtype)
    computed = [(m, name, buf) for m in module.modules() for name, buf in m._buffers.items()
                if buf is not None and name in m._non_persistent_buffers_set]
    module.to(dtype)
    for m, name, buf in computed:
        m._buffers[name] = buf.to(device=m._buffers[name].device)  # the device may have changed, never the values
    return module


def check_config(config) -> None:
    """Refuse, in one line, the model kinds that cannot be a LongMem backbone (before loading weights)."""
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise LongMemError(f"backbone type {model_type!r} is an encoder-decoder; {_UNSUPPORTED_HINT}")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(text, "layer_types", None) or [])
    recurrent = kinds - {"full_attention", "sliding_attention", "chunked_attention", "attention", "sliding_window"}
    if any(k in model_type for k in ("mamba", "rwkv", "xlstm")) or recurrent:
        what = f"layer types {sorted(recurrent)}" if recurrent else "a state-space / recurrent model"
        raise LongMemError(f"backbone type {model_type!r} has {what}, not attention in every layer; {_UNSUPPORTED_HINT}")


# -- the backbone ---------------------------------------------------------------------------------


@dataclass
class _Layout:
    """What the probe pass measured, per layer: heads, head dims, scale, window, soft-cap."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scales: list = field(default_factory=list)
    windows: list = field(default_factory=list)
    rotary: bool = False
    rotary_scales: list = field(default_factory=list)  # per layer: its rotation's magnitude (None: no rotary)


class Backbone(nn.Module):
    """An HF causal LM run through transformers' own layers with LongMem's attention. Frozen (the LongMem
    case): eval mode and no grads, always. ``frozen=False`` serves the baselines that train the backbone
    itself (MemTRM, fine-tuning).

    The model given is switched to ``attn_implementation="longmem"``; called directly (outside LongMem) it
    then computes the family's own eager attention, with transformers' masks. Construction runs a 3-token
    probe that measures the head layout, scale and windows, and refuses a family whose logits it does not
    reproduce or whose attention gets a mask of the family's own.
    """

    def __init__(self, model: nn.Module, frozen: bool = True):
        super().__init__()
        config = getattr(model, "config", None)
        if config is None or not hasattr(model, "base_model"):
            raise LongMemError(f"{type(model).__name__} is not an HF model")
        check_config(config)
        if getattr(model, "get_output_embeddings", lambda: None)() is None or not _is_causal_lm(model):
            raise LongMemError(
                f"{type(model).__name__} is not a causal LM (it has no LM head); "
                f"load it with AutoModelForCausalLM (e.g. GPT2LMHeadModel, LlamaForCausalLM)"
            )
        _register()
        try:
            model.set_attn_implementation(ATTN_NAME)
        except (ValueError, KeyError, ImportError) as e:
            raise LongMemError(f"backbone type {config.model_type!r} cannot take a custom attention function "
                               f"({str(e).splitlines()[0]}); {_UNSUPPORTED_HINT}") from None
        if model.config._attn_implementation != ATTN_NAME:
            raise LongMemError(f"backbone type {config.model_type!r} does not use transformers' attention registry; {_UNSUPPORTED_HINT}")
        self.frozen = frozen
        self.model = model.eval().requires_grad_(False) if frozen else model
        self.text_config = config.get_text_config()
        self.base = model.base_model
        self.blocks = self._find_layers()
        self.norm = self._find_norm()
        self.lm_head = model.get_output_embeddings()
        self.num_layers = len(self.blocks)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.hidden_size = model.get_input_embeddings().embedding_dim
        self.max_positions = int(getattr(self.text_config, "max_position_embeddings", None) or 2048)
        self._fingerprint = None
        self.mask_window = None
        self.rotary_scales = None  # per layer, measured by the probe
        try:
            layout = self._probe()
        except LongMemError:
            raise
        except Exception as e:  # noqa: BLE001 - a family this adapter does not model: one line, not a traceback
            raise LongMemError(f"backbone type {config.model_type!r} failed LongMem's probe pass ({type(e).__name__}: "
                               f"{str(e).splitlines()[0][:160] if str(e) else ''}); {_UNSUPPORTED_HINT}") from None
        self.num_heads, self.num_kv_heads, self.head_dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
        self.scale = layout.scales[0]
        cfg_window = getattr(self.text_config, "sliding_window", None)
        if cfg_window and getattr(self.text_config, "use_sliding_window", True) and not any(layout.windows) \
                and not getattr(self.text_config, "layer_types", None):
            self.mask_window = int(cfg_window)  # e.g. PhiMoE: the window is only in transformers' mask, on every layer
            layout.windows = [self.mask_window] * self.num_layers
        windows = [w for w in layout.windows if w]
        self.sliding_window = min(windows) if windows else None  # narrowest window of any layer (info only)
        self.rotary = layout.rotary
        self.rotary_scales = layout.rotary_scales

    def _find_layers(self) -> nn.ModuleList:
        L = getattr(self.text_config, "num_hidden_layers", None)
        for module in self.base.modules():
            if isinstance(module, nn.ModuleList) and len(module) == L and L:
                return module
        raise LongMemError(f"cannot find the {L} decoder layers of {type(self.model).__name__}; {_UNSUPPORTED_HINT}")

    def _find_norm(self) -> nn.Module:
        for owner in (self.base, getattr(self.base, "decoder", None)):
            for name in _NORM_NAMES:
                norm = getattr(owner, name, None) if owner is not None else None
                if isinstance(norm, nn.Module):
                    return norm
        raise LongMemError(f"cannot find the final norm of {type(self.model).__name__}; {_UNSUPPORTED_HINT}")

    def _probe(self) -> _Layout:
        """Run 3 tokens once to measure the attention layout and to check that this adapter reproduces the
        HF model (every layer calls the attention function once, with no mask of its own; logits agree)."""
        seen: list[dict] = []

        def recorder(i):
            def core(q, k, v, q_raw, k_raw, **local):
                if k.shape[-1] != v.shape[-1]:
                    raise LongMemError(f"{self.model_type!r} has keys and values of different widths ({k.shape[-1]} vs "
                                       f"{v.shape[-1]}, latent attention); the memory bank stores one width")
                seen.append({"layer": i, "H": q.shape[1], "Hkv": k.shape[1], "Dh": k.shape[-1], **local})
                return causal_attention(q, k, v, **local)

            return core

        ids = torch.tensor([[1, 2, 3]], device=self.device) % self.vocab_size
        training = self.model.training
        self.model.eval()  # no dropout in the comparison (a backbone that trains is put back below)
        try:
            with torch.no_grad():
                return self._probe_pass(ids, recorder, seen)
        finally:
            self.model.train(training)

    def _probe_pass(self, ids, recorder, seen) -> _Layout:
        masks: list = []
        out = self._run(ids, None, recorder, raw_layers=(), upto=None, masks=masks)
        layers = [s["layer"] for s in seen]
        if layers != list(range(self.num_layers)):
            raise LongMemError(f"backbone type {self.model_type!r}: the attention function was called for layers {layers[:8]}, "
                               f"not once per layer; {_UNSUPPORTED_HINT}")
        if any(s["H"] % s["Hkv"] or (s["H"], s["Hkv"], s["Dh"]) != (seen[0]["H"], seen[0]["Hkv"], seen[0]["Dh"]) for s in seen):
            raise LongMemError(f"backbone type {self.model_type!r} changes its head layout from layer to layer; the memory needs one")
        for i, mask in enumerate(masks):
            if not _adds_nothing(mask):  # e.g. Doge's dynamic mask: a no-op at random init (its A = 0), not once trained
                raise LongMemError(f"backbone type {self.model_type!r} passes its attention a mask of its own (layer {i}, shape "
                                   f"{tuple(mask.shape)}) that changes scores a token may attend to; LongMem's attention "
                                   f"builds its own causal mask and would drop it")
        mine = self.logits(out.hidden_states[-1]).float()
        ref = self.model(ids).logits.float()  # the HF model itself (the attention function's eager fallback)
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        diff = float((mine - ref).abs().max())
        if not diff <= tol * max(1.0, float(ref.abs().max())):
            raise LongMemError(f"backbone type {self.model_type!r}: LongMem's pass does not reproduce the model's logits (max abs diff "
                               f"{diff:.3g}); its causal-LM head or layers do something this adapter does not know")
        rotary = any(inp.rotary for inp in out.layer_inputs)
        scales = [_rotation_scale(inp.kwargs["position_embeddings"]) if inp.rotary else None for inp in out.layer_inputs]
        return _Layout(seen[0]["H"], seen[0]["Hkv"], seen[0]["Dh"], [s["scale"] for s in seen], [s["window"] for s in seen],
                       rotary, scales)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)  # frozen: dropout stays off whatever the caller asks

    @property
    def name(self) -> str:
        return str(getattr(self.model.config, "_name_or_path", "") or type(self.model).__name__)

    @property
    def model_type(self) -> str:
        return self.model.config.model_type

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- what the SideNet uses -------------------------------------------------------------------

    def copy_block(self, i: int) -> nn.Module:
        """A deep copy of block i (shares no storage), for the SideNet."""
        return copy.deepcopy(self.blocks[i])

    def copy_norm(self) -> nn.Module:
        """A deep copy of the final norm, for the SideNet."""
        return copy.deepcopy(self.norm)

    def block_forward(self, block: nn.Module, x: torch.Tensor, inputs: LayerInputs, core: AttentionCore,
                      raw: bool = False) -> torch.Tensor:
        """Run an HF decoder layer (a backbone block or a copy) on x (B, T, D) with ``core`` as its attention.

        ``inputs``: the layer inputs recorded by the backbone pass over the same tokens (positions, masks).
        ``raw``: give the core the pre-rotary q/k (one extra q/k/v projection of this layer).
        """
        call = _Call(core, _pre_rotary(block, x, inputs) if raw else None, self.mask_window)
        out = block(x, *inputs.args, **inputs.kwargs, **{CALL_KEY: call})
        return out[0] if isinstance(out, tuple) else out

    def logits(self, h: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """LM head over a final norm (the backbone's, or the SideNet's own trainable copy), with the
        family's logit scaling (Gemma's soft-cap, Granite's and Cohere's scales)."""
        z = self.lm_head((norm or self.norm)(h).to(self.lm_head.weight.dtype))  # a SideNet may run in another dtype
        cfg = self.text_config
        if getattr(cfg, _LOGIT_DIVIDE, None):
            z = z / getattr(cfg, _LOGIT_DIVIDE)
        if getattr(cfg, _LOGIT_MULTIPLY, None) and getattr(cfg, _LOGIT_MULTIPLY) != 1:
            z = z * getattr(cfg, _LOGIT_MULTIPLY)
        if getattr(cfg, _LOGIT_SOFTCAP, None):
            cap = getattr(cfg, _LOGIT_SOFTCAP)
            z = torch.tanh(z / cap) * cap
        return z

    # -- the frozen forward ----------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, memory_layer: int, positions: torch.Tensor | None = None,
                cache=None, upto: int | None = None, memory_core: AttentionCore | None = None) -> BackboneOutput:
        """Run one segment. Returns all hidden states, block m's keys/values (pre-rotary), the layer inputs.

        Args:
            input_ids: (B, T) token ids.
            memory_layer: m, the block whose keys/values go to memory.
            positions: (T,) or (1, T) position ids; default 0..T-1 (after the cached tokens, if any).
            cache: a ``KVCache`` holding the window's earlier tokens (incremental decoding), updated in place.
            upto: stop after this block (e.g. m, when only the memory's keys/values are wanted).
            memory_core: attention for block m instead of plain causal attention (the coupled-memory
                baseline puts joint attention there).
        """
        saved = {}

        def core_for(i):
            def core(q, k, v, q_raw, k_raw, **local):
                if i == memory_layer:
                    saved["kv"] = (k_raw, v)  # pre-rotary keys: position-free, like the paper's ALiBi keys
                if cache is not None:
                    k, v = cache.update(i, k, v, k_raw if i == memory_layer else None)
                if i == memory_layer and memory_core is not None:
                    return memory_core(q, k, v, q_raw, k_raw, **local)
                return causal_attention(q, k, v, **local)

            return core

        if positions is None:
            start = len(cache) if cache is not None else 0
            positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self._run(input_ids, positions, core_for, raw_layers=(memory_layer,), upto=upto)
        out.keys, out.values = saved["kv"]
        return out

    def _run(self, input_ids, positions, core_for, raw_layers, upto, masks=None) -> BackboneOutput:
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)
        positions = positions.view(1, -1).expand(B, -1)
        # LongMem's cores build their own causal/window masks (they know the KV cache); a 4D mask here is taken
        # as-is by transformers' mask utilities, which then skip building one per call (it would go unused)
        unused_mask = torch.zeros(1, 1, 1, 1, device=input_ids.device).expand(B, 1, T, T)
        with _Pass(self.blocks, core_for, set(raw_layers), upto, self.mask_window, self.rotary_scales, masks) as run:
            try:
                self.base(input_ids=input_ids, attention_mask=unused_mask, position_ids=positions, use_cache=False)
            except _Stop:
                pass
        return BackboneOutput(hidden_states=run.hidden + [run.last], keys=None, values=None, layer_inputs=run.inputs)

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
