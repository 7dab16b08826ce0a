"""The frozen backbone adapter computes exactly what the HF model computes."""

import pytest
import torch
from torch.testing import assert_close

from conftest import VOCAB, make_gpt2, make_llama
from longmem import LongMemError
from longmem.attention import causal_attention
from longmem.backbone import Backbone, load_causal_lm


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2"])
def test_hidden_states_logits_and_block_m_kv_match_hf(family):
    hf = make_gpt2(attn_implementation="eager") if family == "gpt2" else make_llama(model_type=family, attn_implementation="eager")
    bb = Backbone(hf)
    ids = torch.randint(0, VOCAB, (2, 12))
    m = 3
    out = bb(ids, memory_layer=m)
    ref = hf(ids, output_hidden_states=True, use_cache=True)
    assert len(out.hidden_states) == bb.num_layers + 1
    for i in range(bb.num_layers):  # HF's last entry is after the final norm; ours is the raw Hb[L]
        assert_close(out.hidden_states[i], ref.hidden_states[i])
    assert_close(bb.norm(out.hidden_states[-1]), ref.hidden_states[-1])
    assert_close(bb.logits(out.hidden_states[-1]), ref.logits)
    cached = ref.past_key_values.layers[m]
    keys = out.keys
    if family != "gpt2":  # ours are pre-rotary: rotating them must give HF's cached keys
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        cos, sin = out.layer_inputs[m].kwargs["position_embeddings"]  # what HF gave block m
        _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)
        assert out.keys.shape[1] == 2  # one entry per key/value head (GQA)
    assert_close(keys, cached.keys)
    assert_close(out.values, cached.values)


def test_pre_rotary_keys_do_not_depend_on_position():
    bb = Backbone(make_llama())
    ids = torch.randint(0, VOCAB, (1, 8))
    a = bb(ids, 3, positions=torch.arange(8))
    b = bb(ids, 3, positions=torch.arange(8) + 40)
    assert_close(a.keys[:, :, 0], b.keys[:, :, 0])  # the first token sees only itself: same key


def test_backbone_is_frozen_and_stays_in_eval():
    bb = Backbone(make_gpt2())
    bb.train()
    assert not bb.model.training
    assert not any(p.requires_grad for p in bb.parameters())


def test_unsupported_and_non_causal_models_are_clear_errors():
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2Model

    with pytest.raises(LongMemError, match="is not a causal LM"):
        Backbone(BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)))
    with pytest.raises(LongMemError, match="not a causal LM"):
        Backbone(GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)))
    with pytest.raises(LongMemError, match="is not an HF model"):
        Backbone(torch.nn.Linear(2, 2))


def test_unknown_hub_id_offline_is_a_clear_error():
    with pytest.raises(LongMemError, match="cannot load backbone"):
        load_causal_lm("no-such-org/no-such-model-xyz")


def test_loads_a_saved_model_from_a_local_folder(tmp_path):
    hf = make_llama()
    hf.save_pretrained(tmp_path / "bb")
    bb = Backbone(load_causal_lm(tmp_path / "bb"))
    ids = torch.randint(0, VOCAB, (1, 6))
    assert_close(bb.logits(bb(ids, 3).hidden_states[-1]), hf(ids).logits)
    assert bb.fingerprint() == Backbone(hf).fingerprint()
    assert bb.fingerprint() != Backbone(make_llama(seed=1)).fingerprint()


# every scaled rotary type transformers has; a new type without an entry here fails the test below
ROPE_SCALINGS = {
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"short_factor": [1.0] * 4, "long_factor": [1.0, 2.0, 4.0, 8.0], "original_max_position_embeddings": 32},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
    "proportional": {"factor": 4.0, "partial_rotary_factor": 0.5},
}


@pytest.mark.parametrize("rope_type", sorted(__import__("transformers").modeling_rope_utils.ROPE_INIT_FUNCTIONS))
def test_memory_attention_equals_local_attention_for_the_same_token_under_scaled_rotary(rope_type):
    # YaRN and LongRoPE multiply cos and sin by an attention factor; the pre-rotary keys/queries (what memory
    # attention uses) must keep it: a token's score against its own key is the same locally and in memory
    assert rope_type in ROPE_SCALINGS, f"add the scaled rotary type {rope_type!r} to ROPE_SCALINGS"
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, **ROPE_SCALINGS[rope_type]}
    bb = Backbone(make_llama(rope_parameters=rope, attn_implementation="eager"))
    seen = []

    def core(q, k, v, q_raw, k_raw, **local):
        seen.append((q, k, q_raw, k_raw))
        return causal_attention(q, k, v, **local)

    ids = torch.randint(0, VOCAB, (2, 8))
    out = bb(ids, 2, positions=torch.arange(8) + 100, memory_core=core)  # past the original context: long factors
    bb.block_forward(bb.copy_block(2), out.hidden_states[2], out.layer_inputs[2], core, raw=True)  # the SideNet's way
    for q, k, q_raw, k_raw in seen:
        k, k_raw = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, k_raw))  # (B, H, T, Dh)
        assert_close((q_raw * k_raw).sum(-1), (q * k).sum(-1), rtol=1e-5, atol=1e-5)  # memory vs local, same token


def test_both_ways_to_a_bf16_backbone_give_the_same_logits(tmp_path):
    # from_pretrained(dtype=bf16) computes the rotary frequencies in fp32; converting a loaded model must not round them
    from longmem import LongMem, LongMemConfig

    make_llama().save_pretrained(tmp_path / "bb")
    ids = torch.randint(0, VOCAB, (1, 120))
    direct = load_causal_lm(tmp_path / "bb", dtype="bf16")
    converted = load_causal_lm(load_causal_lm(tmp_path / "bb"), dtype="bf16")
    assert {p.dtype for p in converted.parameters()} == {torch.bfloat16}
    assert torch.equal(direct(ids).logits, converted(ids).logits)
    cfg = LongMemConfig(chunk_size=2, memory_size=32, topk_chunks=2, segment_length=120)
    LongMem.from_backbone(tmp_path / "bb", cfg).save_pretrained(tmp_path / "m")  # fp32, then loaded as bf16
    a = LongMem.from_backbone(tmp_path / "bb", cfg, dtype=torch.bfloat16)
    b = LongMem.from_pretrained(tmp_path / "m", dtype="bf16")
    assert torch.equal(a.backbone_logits(ids), b.backbone_logits(ids))
