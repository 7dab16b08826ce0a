"""LongMem as a whole: SideNet initialisation and equations, invariants, persistence, errors."""

import builtins
import copy
import json
import pathlib

import pytest
import torch
from torch.testing import assert_close

from conftest import VOCAB, make_gpt2, make_llama
from longmem import LongMem, LongMemConfig, LongMemError
from longmem.baselines import CoupledMemoryLM
from longmem.io import CONFIG_FILE
from longmem.loading import load_model_and_tokenizer

CFG = LongMemConfig(chunk_size=2, memory_size=64, topk_chunks=4)


@pytest.fixture
def model(backbone_hf):
    return LongMem.from_backbone(backbone_hf, CFG).eval()


def segments(n=4, B=2, T=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (B, T), generator=g) for _ in range(n)]


def test_defaults_follow_the_paper():
    cfg = LongMemConfig()
    assert (cfg.chunk_size, cfg.memory_size, cfg.topk_chunks, cfg.retrieved_tokens) == (4, 65536, 16, 64)
    from longmem.config import default_memory_layer

    assert default_memory_layer(24) == 17  # the paper's m for a 24-layer backbone
    m = LongMem.from_backbone(make_llama(layers=8))
    assert (m.memory_layer, m.sidenet.memory_index, m.sidenet.num_layers) == (5, 2, 4)


def test_sidenet_blocks_are_copies_of_odd_backbone_blocks(model):
    bb = model.backbone
    assert model.sidenet.num_layers == bb.num_layers // 2
    for i, block in enumerate(model.sidenet.blocks):
        src = bb.blocks[2 * i + 1]
        for (n1, p1), (n2, p2) in zip(block.named_parameters(), src.named_parameters()):
            assert n1 == n2 and torch.equal(p1, p2)
            assert p1.data_ptr() != p2.data_ptr()  # a copy, never an alias
    for p1, p2 in zip(model.sidenet.norm.parameters(), bb.norm.parameters()):
        assert torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    assert torch.equal(model.sidenet.gate, torch.zeros(bb.num_heads))


def _hf_block(hf, block, x):
    """Run an HF block through HF's own forward, with an explicit causal mask."""
    T = x.shape[1]
    mask = torch.full((T, T), float("-inf")).triu(1).view(1, 1, T, T)
    if hf.config.model_type == "gpt2":
        out = block(x, attention_mask=mask)
    else:
        pe = hf.model.rotary_emb(x, torch.arange(T).view(1, -1))
        out = block(x, attention_mask=mask, position_embeddings=pe)
    return out[0] if isinstance(out, tuple) else out


def test_sidenet_without_memory_is_eq2_over_hf_blocks(backbone_hf):
    """x_{i+1} = Block_i(x_i) + Hb[2i+2] - Hb[2i], logits = head(norm(x_Ls)), restated with HF's own modules."""
    hf = copy.deepcopy(backbone_hf)
    hf.config._attn_implementation = "eager"
    model = LongMem.from_backbone(hf, CFG).eval()
    with torch.no_grad():
        for p in model.sidenet.parameters():  # make the SideNet differ from the backbone
            p.add_(0.05 * torch.randn_like(p))
    ids = segments(1)[0]
    hb = hf(ids, output_hidden_states=True).hidden_states[:-1]
    hb = list(hb) + [model.backbone(ids, model.memory_layer).hidden_states[-1]]
    x = hb[0]
    for i, block in enumerate(model.sidenet.blocks):
        x = _hf_block(hf, block, x) + hb[2 * i + 2] - hb[2 * i]
    ref = hf.get_output_embeddings()(model.sidenet.norm(x))
    assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-5)


def test_empty_memory_equals_no_memory_and_write_follows_read(model):
    ids = segments(1)[0]
    mem = model.new_memory(2)
    assert_close(model(ids, memory=mem).logits, model(ids).logits, rtol=0, atol=0)
    assert mem.num_tokens(0) == 16  # written after the read


def test_closed_gate_equals_no_memory(model):
    with torch.no_grad():
        model.sidenet.gate.fill_(float("-inf"))
    mem = model.new_memory(2)
    for ids in segments(3):
        assert_close(model(ids, memory=mem).logits, model(ids).logits, rtol=0, atol=0)


def test_memory_changes_predictions(model):
    """A segment that repeats text only in memory (not in the local window) is predicted differently."""
    first, filler, _ = segments(3, B=1)
    mem = model.new_memory(1)
    model(first, memory=mem)
    model(filler, memory=mem)
    with_memory = model(first, memory=mem, update_memory=False).logits
    assert not torch.allclose(with_memory, model(first).logits, atol=1e-4)
    # and the memory is actually read: the retrieved chunks come from the stored stream
    assert mem.num_tokens(0) == 32


def test_k_c_is_the_configs_at_every_search_unless_a_memory_has_its_own(model, tmp_path):
    """A model's memory holds no k_c: the config's is read at each search (a reloaded memory too), so changing it
    changes what is retrieved; ``new_memory(topk_chunks=)`` gives one memory its own (an evaluation's --topk-chunks)."""
    *past, last = segments(4)
    mem = model.new_memory(2)
    assert mem.topk_chunks is None
    for ids in past:
        model(ids, memory=mem)
    mem.save(tmp_path / "mem.safetensors")
    with torch.no_grad():
        four = model(last, memory=mem, update_memory=False).logits
        model.config = model.config.replace(topk_chunks=1)
        one = model(last, memory=mem, update_memory=False).logits
        assert not torch.allclose(one, four, atol=1e-4)
        assert_close(model(last, memory=model.load_memory(tmp_path / "mem.safetensors"), update_memory=False).logits, one, rtol=0, atol=0)
        model.config = model.config.replace(topk_chunks=4)
        own = model.new_memory(2, topk_chunks=1)
        for ids in past:
            model(ids, memory=own)
        assert_close(model(last, memory=own, update_memory=False).logits, one, rtol=0, atol=0)


def test_batch_rows_are_independent(model):
    """Row 0 of a batch of two streams equals the same stream alone: no document sees another's memory."""
    both = segments(4, B=2)
    alone = [s[:1] for s in both]
    mem2, mem1 = model.new_memory(2), model.new_memory(1)
    for s2, s1 in zip(both, alone):
        assert_close(model(s2, memory=mem2).logits[:1], model(s1, memory=mem1).logits, rtol=1e-5, atol=1e-5)


def test_only_the_sidenet_trains_and_the_backbone_stays_bit_identical(model):
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    side_before = {k: v.clone() for k, v in model.sidenet.state_dict().items()}
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.parameters() if p.requires_grad}
    model.train()
    mem = model.new_memory(2)
    for ids in segments(3):
        loss = model(ids, memory=mem, labels=ids).loss
        loss.backward()
        opt.step(), opt.zero_grad()
    assert not model.backbone.model.training
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.backbone.parameters())
    changed = [k for k, v in model.sidenet.state_dict().items() if not torch.equal(v, side_before[k])]
    assert "gate" in changed and len(changed) == len(side_before)  # every SideNet tensor moved, the gate too


def test_loss_is_hf_style_shifted_cross_entropy(model):
    ids = segments(1)[0]
    labels = ids.clone()
    labels[:, :5] = -100
    out = model(ids, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert_close(out.loss, ref)


def test_logits_at_scored_positions_equal_the_full_logits_and_train_the_same(model):
    """``logits_at`` (the LM head only where a token is scored) gives the full pass's logits at those positions, and a
    training step that scores only there has the same loss and the same gradients."""
    from longmem.model import IGNORE
    from longmem.training.step import MicroBatch, Optimization, train_step

    ids = segments(1)[0]
    targets = torch.full_like(ids, IGNORE)
    targets[0, 3], targets[0, 9], targets[1, 15] = 7, 8, 9
    mem = model.new_memory(2)
    model(segments(1, seed=1)[0], memory=mem)
    full = model(ids, memory=mem, update_memory=False).logits
    part = model(ids, memory=mem, update_memory=False, logits_at=targets != IGNORE).logits
    assert part.shape == (1, 3, full.shape[-1])
    assert_close(part[0], full[targets != IGNORE])
    with pytest.raises(LongMemError, match="logits_at"):
        model(ids, labels=ids, logits_at=targets != IGNORE)

    losses, after = [], []
    for scored_only in (False, True):  # one SGD step of each from the same weights: same loss, same update
        net = copy.deepcopy(model).train()
        params = list(net.trainable_parameters())
        opt = Optimization(torch.optim.SGD(params, lr=0.5), None, torch.amp.GradScaler("cpu", enabled=False), params,
                           None, None)
        losses.append(train_step(net, [MicroBatch(ids, targets, memory=copy.deepcopy(mem), scored_only=scored_only)],
                                 opt).loss)
        after.append(torch.cat([p.detach().flatten() for p in params]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert not torch.equal(after[0], torch.cat([p.detach().flatten() for p in model.trainable_parameters()]))
    assert_close(after[0], after[1])


def test_save_pretrained_from_pretrained_gives_identical_logits(model, tmp_path):
    with torch.no_grad():
        for p in model.sidenet.parameters():
            p.add_(0.01)
    model.backbone.model.save_pretrained(tmp_path / "bb")
    model.save_pretrained(tmp_path / "lm")
    loaded = LongMem.from_pretrained(tmp_path / "lm", backbone=tmp_path / "bb").eval()
    mem_a, mem_b = model.new_memory(2), loaded.new_memory(2)
    for ids in segments(3):
        assert_close(loaded(ids, memory=mem_b).logits, model(ids, memory=mem_a).logits, rtol=0, atol=0)
    model.save_pretrained(tmp_path / "self", save_backbone=True)  # self-contained folder
    again = LongMem.from_pretrained(tmp_path / "self").eval()
    ids = segments(1, seed=5)[0]
    assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_a_load_reads_longmem_json_once(tiny_assets, tmp_path, monkeypatch):
    """``load_model_and_tokenizer`` reads a checkpoint's ``longmem.json`` once and hands the parsed settings down to
    ``load_model`` and ``from_pretrained`` (a LongMem checkpoint and a baseline's)."""
    cfg = LongMemConfig(chunk_size=2, memory_size=64, topk_chunks=4, segment_length=16)
    LongMem.from_backbone(tiny_assets["backbone"], cfg).save_pretrained(tmp_path / "longmem", save_backbone=True,
                                                                        tokenizer=tiny_assets["tokenizer"])
    CoupledMemoryLM.from_backbone(tiny_assets["backbone"], cfg).save_pretrained(tmp_path / "memtrm", tokenizer=tiny_assets["tokenizer"])
    reads = []
    read_text, read_bytes, _open = pathlib.Path.read_text, pathlib.Path.read_bytes, builtins.open
    monkeypatch.setattr(pathlib.Path, "read_text", lambda self, *a, **k: (reads.append(self), read_text(self, *a, **k))[1])
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: (reads.append(self), read_bytes(self))[1])
    monkeypatch.setattr(builtins, "open", lambda file, *a, **k: (reads.append(pathlib.Path(file)) if isinstance(file, (str, pathlib.Path)) else None,
                                                                 _open(file, *a, **k))[1])
    for folder in ("longmem", "memtrm"):
        reads.clear()
        model, _ = load_model_and_tokenizer(tmp_path / folder)
        assert model.method == folder
        assert [p for p in reads if p.name == CONFIG_FILE] == [tmp_path / folder / CONFIG_FILE]


def test_checkpoint_from_another_backbone_is_refused(model, tmp_path):
    model.save_pretrained(tmp_path / "lm")
    other = make_llama(seed=7) if model.backbone.model_type == "llama" else make_gpt2(seed=7)
    with pytest.raises(LongMemError, match="another backbone"):
        LongMem.from_pretrained(tmp_path / "lm", backbone=other)
    with pytest.raises(LongMemError, match="not a LongMem checkpoint"):
        LongMem.from_pretrained(tmp_path)


def test_memory_save_load_gives_identical_logits(model, tmp_path):
    segs = segments(4)
    mem = model.new_memory(2)
    for ids in segs[:3]:
        model(ids, memory=mem)
    mem.save(tmp_path / "m.safetensors")
    loaded = model.load_memory(tmp_path / "m.safetensors")
    assert_close(model(segs[3], memory=loaded).logits, model(segs[3], memory=mem).logits, rtol=0, atol=0)


def test_memory_of_another_model_is_refused(model, tmp_path):
    other = LongMem.from_backbone(make_llama(seed=3), CFG)
    mem = other.new_memory(2)
    with pytest.raises(LongMemError, match="another model"):
        model(segments(1)[0], memory=mem)
    mem.save(tmp_path / "o.safetensors")
    with pytest.raises(LongMemError, match="another model"):
        model.load_memory(tmp_path / "o.safetensors")


def test_bad_inputs_are_clear_errors(model):
    ids = segments(1)[0]
    cases = [
        (lambda: model(ids.float()), "integer tensor"),
        (lambda: model(ids[0]), "shape \\(batch, tokens\\)"),
        (lambda: model(ids + VOCAB), "token ids must lie in"),
        (lambda: model(ids[:, :0]), "empty"),
        (lambda: model(torch.randint(0, VOCAB, (1, 200))), "longer than the backbone's context"),
        (lambda: model(ids, labels=ids[:, :3]), "labels must have the shape"),
        (lambda: model(ids, memory=model.new_memory(3)), "3 rows"),
        (lambda: model(ids, memory="mem"), "MemoryBank"),
        (lambda: LongMemConfig(memory_layer=2), "odd"),
        (lambda: LongMemConfig(memory_size=10, chunk_size=4), "multiple"),
        (lambda: LongMem.from_backbone(make_llama(), LongMemConfig(memory_layer=5)), "no SideNet layer"),
    ]
    for call, message in cases:
        with pytest.raises(LongMemError, match=message):
            call()


def test_damaged_checkpoint_is_detected(model, tmp_path):
    model.save_pretrained(tmp_path / "lm")
    w = tmp_path / "lm" / "sidenet.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0x10
    w.write_bytes(bytes(data))
    with pytest.raises(LongMemError, match="damaged"):
        LongMem.from_pretrained(tmp_path / "lm", backbone=model.backbone.model)
    (tmp_path / "lm" / "longmem.json").write_text("{not json")
    with pytest.raises(LongMemError, match="not valid JSON"):
        LongMem.from_pretrained(tmp_path / "lm")


def test_cosine_retrieval_metric_is_saved_and_memories_must_match_it(backbone_hf, tmp_path):
    model = LongMem.from_backbone(backbone_hf, CFG.replace(retrieval_metric="cosine")).eval()
    assert CFG.retrieval_metric == "ip"  # the paper's default
    mem = model.new_memory(2)
    assert mem.metric == "cosine"
    for ids in segments(3):
        model(ids, memory=mem)
    model.save_pretrained(tmp_path / "m", save_backbone=True)
    back = LongMem.from_pretrained(tmp_path / "m").eval()
    assert back.config.retrieval_metric == "cosine"
    ids = segments(1, seed=5)[0]
    assert torch.equal(back(ids, memory=copy.deepcopy(mem)).logits, model(ids, memory=copy.deepcopy(mem)).logits)
    ip = LongMem.from_backbone(backbone_hf, CFG).eval()
    with pytest.raises(LongMemError, match="ranks chunks by 'cosine'"):
        ip(ids, memory=mem)


def test_an_altered_setting_in_longmem_json_is_detected(model, tmp_path):
    model.save_pretrained(tmp_path / "m", save_backbone=True)
    cfg = tmp_path / "m" / "longmem.json"
    meta = json.loads(cfg.read_text())
    assert len(meta["sha256"]) == 64
    meta["config"]["topk_chunks"] += 1  # a plausible, silent change: a valid JSON and a valid config
    cfg.write_text(json.dumps(meta, indent=2))
    with pytest.raises(LongMemError, match="longmem.json is damaged"):
        LongMem.from_pretrained(tmp_path / "m")
    del meta["sha256"]  # files written before the checksum still load
    meta["config"]["topk_chunks"] -= 1
    cfg.write_text(json.dumps(meta, indent=2))
    assert LongMem.from_pretrained(tmp_path / "m").config.topk_chunks == model.config.topk_chunks


def test_key_retrieval_searches_with_the_backbones_own_keys(backbone_hf):
    """retrieval_query="key": the search query of each token is its block-m key, the space the memory stores, so a
    repeated context finds the exact place it was seen (csz 1, cosine: its own stored key scores 1)."""
    cfg = CFG.replace(chunk_size=1, topk_chunks=2, retrieval_metric="cosine", retrieval_query="key")
    model = LongMem.from_backbone(backbone_hf, cfg).eval()
    assert CFG.retrieval_query == "query"  # the paper's default
    ids = segments(1, B=2, T=16, seed=3)[0]
    mem = model.new_memory(2)
    with torch.no_grad():
        model(ids, memory=mem)  # 16 tokens stored, slots 0..15
        search, seen = mem.search, {}

        def spy(q, **kw):
            seen["q"], seen["r"] = q, search(q, **kw)
            return seen["r"]

        mem.search = spy
        model(ids, memory=mem, update_memory=False)  # the same text again
        keys = model.backbone(ids, model.memory_layer).keys
    assert torch.equal(seen["q"], keys)  # (B, Hkv, T, Dh): not the query projection
    top = seen["r"].chunks[..., 0]  # (B, Hkv, T) best slot of each token
    assert torch.equal(top, torch.arange(16).expand_as(top))
    # the paper's query-based search (same weights) searches with the query projection and misses some of them
    paper = LongMem.from_backbone(backbone_hf, cfg.replace(retrieval_query="query")).eval()
    paper.sidenet.load_state_dict(model.sidenet.state_dict())
    mem.search = spy
    with torch.no_grad():
        paper(ids, memory=mem, update_memory=False)
    assert seen["q"].shape[1] == model.backbone.num_heads and not torch.equal(seen["q"][:, : keys.shape[1]], keys)
    assert (seen["r"].chunks[..., 0] != torch.arange(16)).any()


def test_key_retrieval_is_saved_and_older_files_read_as_query(backbone_hf, tmp_path):
    model = LongMem.from_backbone(backbone_hf, CFG.replace(retrieval_query="key")).eval()
    model.save_pretrained(tmp_path / "m", save_backbone=True)
    back = LongMem.from_pretrained(tmp_path / "m").eval()
    assert back.config.retrieval_query == "key"
    mem_a, mem_b = model.new_memory(2), back.new_memory(2)
    for ids in segments(3):
        assert torch.equal(model(ids, memory=mem_a).logits, back(ids, memory=mem_b).logits)
    old = LongMemConfig.from_dict({k: v for k, v in CFG.to_dict().items() if k not in ("retrieval_query", "retrieval_next")})
    assert old.retrieval_query == "query" and old.retrieval_next is False
    with pytest.raises(LongMemError, match="retrieval_query must be one of"):
        LongMemConfig(retrieval_query="value")


def test_next_chunk_retrieval_adds_each_retrieved_chunks_successor_and_is_saved(backbone_hf, tmp_path):
    """retrieval_next: the memory layer attends to the k_c retrieved chunks and the chunk written after each; with
    an empty memory it is plain attention, and the option survives save -> load."""
    cfg = CFG.replace(retrieval_query="key", retrieval_metric="cosine", retrieval_next=True)
    model = LongMem.from_backbone(backbone_hf, cfg).eval()
    assert cfg.retrieved_tokens == 2 * cfg.topk_chunks * cfg.chunk_size
    ids = segments(3, B=2)
    mem, seen = model.new_memory(2), {}
    search = mem.search

    def spy(q, **kw):
        seen["kw"], seen["r"] = kw, search(q, **kw)
        found = seen["r"].chunks[..., : cfg.topk_chunks]
        succ = mem.next_slots(found)  # before this segment's write
        seen["successors"] = succ.masked_fill((succ.unsqueeze(-1) == found.unsqueeze(-2)).any(-1), -1)  # each chunk once
        return seen["r"]

    mem.search = spy
    with torch.no_grad():
        empty = model(ids[0], memory=mem).logits  # nothing stored yet
        assert torch.equal(empty, model(ids[0]).logits)
        for seg in ids[1:]:
            model(seg, memory=mem)
    assert seen["kw"] == {"next_chunks": True, "topk_chunks": cfg.topk_chunks}  # k_c: the config's
    r = seen["r"]
    assert r.keys.shape[-2] == cfg.retrieved_tokens and r.chunks.shape[-1] == 2 * cfg.topk_chunks
    assert torch.equal(r.chunks[..., cfg.topk_chunks:], seen["successors"])
    assert (seen["successors"] >= 0).any() and (seen["successors"] == -1).any()  # the newest chunk has none
    model.save_pretrained(tmp_path / "m", save_backbone=True)
    back = LongMem.from_pretrained(tmp_path / "m").eval()
    assert back.config.retrieval_next is True
    with pytest.raises(LongMemError, match="retrieval_next must be true or false"):
        LongMemConfig(retrieval_next="yes")
