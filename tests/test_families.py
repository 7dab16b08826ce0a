"""Every supported model family, built from its config class with tiny random weights: the adapter over
transformers' own layers reproduces HF, stores position-free keys, and LongMem's invariants hold.

The family list is the README's "Supported model families" table (``python scripts/family_matrix.py``
regenerates it from these tests and also tries every other decoder-only family in transformers).
"""

import copy
import sys

import pytest
import torch
from torch.testing import assert_close

from longmem import LongMem, LongMemConfig
from longmem.backbone import Backbone
from longmem.generation import Decoder

FAMILIES = ["gpt2", "gpt_neox", "opt", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3_text",
            "phi3", "olmo2", "smollm3", "granite", "starcoder2"]
VOCAB, T, WINDOW = 256, 16, 8  # WINDOW < T: families with a sliding window exercise it
CFG = LongMemConfig(chunk_size=2, memory_size=64, topk_chunks=4, segment_length=T)


def tiny_config(model_type: str, layers: int = 4):
    """A tiny config of any family from its config class (no download): 4 layers, hidden 64, vocab 256."""
    from transformers import AutoConfig

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
              max_position_embeddings=128, tie_word_embeddings=False)
    extra = {"head_dim": 16, "ffn_dim": 128, "word_embed_proj_dim": 64, "sliding_window": WINDOW,
             "n_inner": 128, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
             "num_local_experts": 4, "num_experts": 4, "num_experts_per_tok": 2, "query_pre_attn_scalar": 16,
             "attention_chunk_size": 8}
    have = AutoConfig.for_model(model_type).get_text_config().to_dict()
    kw.update({k: v for k, v in extra.items() if k in have})  # through __init__, so that a reload gives the same config
    cfg = AutoConfig.for_model(model_type, **kw).get_text_config()
    for key in list(cfg.to_dict()):  # deterministic: no dropout anywhere
        if ("dropout" in key or key.endswith("_pdrop")) and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)
    return cfg


def make_model(model_type: str, seed: int = 0, attn: str = "eager"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type), attn_implementation=attn).eval()


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(HF reference model with eager attention, LongMem over a copy of it)."""
    hf = make_model(request.param)
    model = LongMem.from_backbone(copy.deepcopy(hf), CFG).eval()
    return hf, model


def ids(B=2, n=T, seed=0):
    return torch.randint(3, VOCAB, (B, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_1_backbone_pass_gives_hf_logits(family):
    hf, model = family
    x = ids()
    ref = hf(x).logits
    bb = model.backbone(x, model.memory_layer)
    assert len(bb.hidden_states) == bb_layers(model) + 1
    assert_close(model.backbone.logits(bb.hidden_states[-1]), ref, rtol=0, atol=1e-5)


def bb_layers(model):
    return model.backbone.num_layers


@torch.no_grad()
def test_2_stored_keys_values_are_the_pre_rotary_projections(family):
    """Against HF's own cache: the stored keys, rotated by the family's own rotary function with the cos/sin HF
    gave block m, are HF's cached keys; values equal HF's. And the keys do not depend on position."""
    hf, model = family
    m, x = model.memory_layer, ids()
    out = model.backbone(x, m)
    ref = hf(x, use_cache=True).past_key_values.layers[m]
    n = ref.keys.shape[2]  # a sliding-window layer caches only its last tokens
    # (Hb[m] itself differs from HF eager by float rounding, hence the tolerances)
    assert out.keys.shape == out.values.shape == (2, model.backbone.num_kv_heads, T, model.backbone.head_dim)
    assert_close(out.values[:, :, T - n:], ref.values, rtol=1e-5, atol=1e-5)
    pe = out.layer_inputs[m].kwargs.get("position_embeddings")
    keys, hf_keys = out.keys[:, :, T - n:], ref.keys
    if pe is not None and not torch.allclose(keys, hf_keys, rtol=1e-5, atol=1e-5):  # (NoPE layers: no rotation)
        rotate = getattr(sys.modules[type(hf).__module__], "apply_rotary_pos_emb")
        r = pe[0].shape[-1]  # partial rotary (Phi, Persimmon): the family rotates the first r dims only
        keys = torch.cat([rotate(out.keys[..., :r], out.keys[..., :r], *pe)[1], out.keys[..., r:]], dim=-1)[:, :, T - n:]
    assert_close(keys, hf_keys, rtol=1e-5, atol=1e-5)
    if pe is not None:  # position-free: the first token's key is the same at position 0 and at position 40
        shifted = model.backbone(x, m, positions=torch.arange(T) + 40)
        assert_close(shifted.keys[:, :, 0], out.keys[:, :, 0], rtol=1e-5, atol=1e-5)


def test_3_sidenet_blocks_are_unshared_copies_of_odd_backbone_blocks(family):
    _, model = family
    bb = model.backbone
    for i, block in enumerate(model.sidenet.blocks):
        src = bb.blocks[2 * i + 1].state_dict()
        mine = block.state_dict()
        assert mine.keys() == src.keys()
        assert all(torch.equal(mine[k], src[k]) for k in src)
    ptrs = {p.data_ptr() for p in bb.parameters()}
    assert not any(p.data_ptr() in ptrs for p in model.sidenet.parameters())


@torch.no_grad()
def test_4_empty_memory_closed_gate_and_memory_with_content(family):
    _, model = family
    x, later = ids(seed=1), ids(seed=2)
    plain = model(later).logits
    assert_close(model(later, memory=model.new_memory(2)).logits, plain, rtol=0, atol=0)  # empty = none
    mem = model.new_memory(2)
    model(x, memory=mem)
    model.sidenet.gate.fill_(1.0)
    assert (model(later, memory=mem, update_memory=False).logits - plain).abs().max() > 1e-4  # content changes logits
    model.sidenet.gate.fill_(-1e4)  # closed: sigmoid = 0
    assert_close(model(later, memory=mem, update_memory=False).logits, plain, rtol=1e-5, atol=1e-5)
    model.sidenet.gate.zero_()


@torch.no_grad()
def test_5_incremental_generation_equals_recompute(family):
    _, model = family
    model.sidenet.gate.fill_(1.0)
    mem = model.new_memory(2)
    model(ids(seed=3), memory=mem)
    stream = ids(n=12, seed=4)
    dec = Decoder(model, 2, mem, window=T)
    got = torch.stack([dec.feed(stream[:, i:i + 1]) for i in range(12)], dim=1)
    ref = torch.stack([model(stream[:, :p], memory=mem, update_memory=False).logits[:, -1] for p in range(1, 13)], dim=1)
    model.sidenet.gate.zero_()
    assert_close(got, ref.float(), rtol=1e-4, atol=1e-5)


def test_6_training_keeps_backbone_bit_identical(family):
    _, model = family
    model = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.backbone.model.state_dict().items()}
    side = {k: v.clone() for k, v in model.sidenet.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    mem = model.new_memory(2)
    model.train()
    for step in range(3):
        x = ids(seed=10 + step)
        loss = model(x, memory=mem, labels=x).loss
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert any(not torch.equal(side[k], v) for k, v in model.sidenet.state_dict().items())


@torch.no_grad()
def test_7_save_load_model_and_memory(family, tmp_path):
    _, model = family
    with torch.no_grad():
        for p in model.sidenet.parameters():
            p.add_(0.01)
    mem = model.new_memory(2)
    model(ids(seed=5), memory=mem)
    model.save_pretrained(tmp_path / "m", save_backbone=True)
    mem.save(tmp_path / "mem")
    loaded = LongMem.from_pretrained(tmp_path / "m").eval()
    mem2 = type(mem).load(tmp_path / "mem")  # (its model name is the in-memory instance's; the fingerprint matches)
    assert mem2.info["fingerprint"] == loaded.backbone.fingerprint()
    x = ids(seed=6)
    assert_close(loaded(x, memory=mem2).logits, model(x, memory=mem).logits, rtol=0, atol=0)
    with torch.no_grad():
        for p in model.sidenet.parameters():
            p.sub_(0.01)


@torch.no_grad()
def test_8_batch_rows_are_isolated(family):
    _, model = family
    model.sidenet.gate.fill_(1.0)
    a, b = ids(B=1, seed=7), ids(B=1, seed=8)
    mem1, mem2 = model.new_memory(1), model.new_memory(2)
    model(a, memory=mem1)
    model(torch.cat([a, b]), memory=mem2)
    q = ids(B=1, seed=9)
    alone = model(q, memory=mem1).logits
    both = model(torch.cat([q, ids(B=1, seed=11)]), memory=mem2).logits
    model.sidenet.gate.zero_()
    assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)


# -- what the adapter refuses, in one line --------------------------------------------------------------


@torch.no_grad()
def test_9_identity_start_gives_the_backbone_logits(family):
    """sidenet_init="identity": at step 0 the SideNet is the backbone, with or without memory content; the
    skipped blocks are the ones whose scale is 0, and a non-zero scale brings its block back."""
    hf, _ = family
    model = LongMem.from_backbone(copy.deepcopy(hf), CFG.replace(sidenet_init="identity")).eval()
    x, later = ids(seed=1), ids(seed=2)
    ref = hf(later).logits
    mem = model.new_memory(2)
    model(x, memory=mem)
    assert model.sidenet.skipped_blocks() == set(range(model.sidenet.num_layers))
    assert_close(model(later).logits, ref, rtol=0, atol=1e-5)
    assert_close(model(later, memory=mem, update_memory=False).logits, ref, rtol=0, atol=1e-5)
    j = model.sidenet.memory_index
    model.sidenet.scales[j].fill_(1.0)
    model.sidenet.gate.fill_(1.0)
    assert model.sidenet.skipped_blocks() == set(range(model.sidenet.num_layers)) - {j}
    assert (model(later, memory=mem, update_memory=False).logits - ref).abs().max() > 1e-4


@torch.no_grad()
def test_9_memory_delta_start_is_the_backbone_without_memory_whatever_is_trained(family):
    """sidenet_init="memory-delta": with block j's scale, weights and the gate moved off their start, the model
    without memory and with an empty memory still gives the backbone's logits; with memory it does not."""
    hf, _ = family
    model = LongMem.from_backbone(copy.deepcopy(hf), CFG.replace(sidenet_init="memory-delta")).eval()
    x, later = ids(seed=1), ids(seed=2)
    ref = hf(later).logits
    mem = model.new_memory(2)
    model(x, memory=mem)
    assert_close(model(later, memory=mem, update_memory=False).logits, ref, rtol=0, atol=1e-5)  # alpha 0
    j = model.sidenet.memory_index
    model.sidenet.scales[j].fill_(1.5)
    model.sidenet.gate.fill_(1.0)
    torch.manual_seed(0)
    for p in model.sidenet.blocks[j].parameters():
        p.add_(0.05 * torch.randn_like(p))
    assert_close(model(later).logits, ref, rtol=0, atol=1e-5)
    assert_close(model(later, memory=model.new_memory(2)).logits, ref, rtol=0, atol=1e-5)
    assert (model(later, memory=mem, update_memory=False).logits - ref).abs().max() > 1e-4


@pytest.mark.parametrize("model_type, says", [
    ("t5", "encoder-decoder"),  # an encoder-decoder
    ("mamba", "not attention in every layer"),  # a state-space model
    ("bloom", "does not use transformers' attention registry"),  # ALiBi inside its own attention: no hook
    ("gpt_oss", "attention sinks"),
    ("doge", "passes its attention a mask of its own"),  # a learned dynamic mask: a no-op at random init, so the logits agree
])
def test_unsupported_families_fail_with_one_line(model_type, says):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from longmem import LongMemError

    torch.manual_seed(0)
    if model_type == "t5":
        hf = AutoModelForSeq2SeqLM.from_config(AutoConfig.for_model("t5", d_model=32, d_ff=64, num_layers=2, num_heads=2,
                                                                    d_kv=16, vocab_size=VOCAB))
    else:
        hf = AutoModelForCausalLM.from_config(tiny_config(model_type))
    with pytest.raises(LongMemError, match=says) as e:
        LongMem.from_backbone(hf)
    assert "\n" not in str(e.value)


def test_bf16_backbone_loads_at_half_the_bytes_and_runs(tmp_path):
    hf = make_model("qwen3")
    fp32 = sum(p.numel() * p.element_size() for p in hf.parameters())
    hf.save_pretrained(tmp_path / "bb")
    model = LongMem.from_backbone(tmp_path / "bb", CFG, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.backbone.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.sidenet.parameters()} == {torch.float32}  # it trains (under autocast) in fp32
    assert sum(p.numel() * p.element_size() for p in model.backbone.model.parameters()) == fp32 // 2
    mem = model.new_memory(2)
    with torch.no_grad():
        model(ids(), memory=mem)
        logits = model(ids(seed=1), memory=mem).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all() and mem.keys.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "m")  # a checkpoint loads converted, after its fingerprint is checked in fp32
    back = LongMem.from_pretrained(tmp_path / "m", dtype="bf16")
    assert back.dtype == torch.bfloat16


def test_sliding_window_and_softcap_match_a_naive_restatement():
    """causal_attention with a window and a soft-cap, with a KV cache (queries are the last T of S keys)."""
    from longmem.attention import causal_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g), torch.randn(2, 2, 12, 8, generator=g)
    for window, cap in ((4, None), (None, 3.0), (4, 3.0)):
        got = causal_attention(q, k, v, scale=0.3, window=window, softcap=cap)
        kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        s = q @ kk.transpose(-1, -2) * 0.3
        if cap:
            s = torch.tanh(s / cap) * cap
        pos_q, pos_k = torch.arange(7, 12).view(-1, 1), torch.arange(12).view(1, -1)
        ok = (pos_k <= pos_q) & ((pos_k > pos_q - window) if window else True)
        ref = s.masked_fill(~ok, float("-inf")).softmax(-1) @ vv
        assert_close(got, ref)
