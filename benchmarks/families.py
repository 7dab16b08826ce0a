"""The family-generic backbone adapter (issue 17): its speed against the hand-written path it replaced, and
LongMem at real backbone shapes (random weights) in fp32 and bf16.

    python benchmarks/families.py [--quick] [--part compare|real|all] [--json PATH]

(a) compare: GPT-2 and Llama shapes, the same weights run (1) through the adapter over transformers' own
    decoder layers (longmem.backbone) and (2) through the hand-written per-family block code of before
    (kept below, ``_Old*``, only for this comparison); LongMem forward with a memory, one adaptation
    step (forward + backward + AdamW), and incremental generation (tokens/s). The two paths' logits are
    checked to agree before timing. ratio = old time / new time (> 1: the adapter is faster).
(b) real: config dicts of Qwen3-0.6B, Llama-3.2-1B and SmolLM2-360M (written below, no download), random
    weights, on CPU, one child process per (model, dtype) so that peak RSS is the model's own: LongMem
    forward tokens/s against the backbone's own HF forward, peak RSS, memory-bank bytes per stored token.
"""

from __future__ import annotations

import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, parse, parser, setup  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from longmem import LongMem, LongMemConfig  # noqa: E402
from longmem.attention import causal_attention, joint_attention  # noqa: E402
from longmem.backbone import BackboneOutput  # noqa: E402
from longmem.generation import Decoder  # noqa: E402

# -- real shapes (from the models' published config.json files; weights random) --------------------------
REAL = {
    "Qwen3-0.6B": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
    "SmolLM2-360M": dict(model_type="llama", vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, head_dim=64, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}
# -- comparison shapes: GPT-2 small-ish and longmem-tiny's Llama shape -----------------------------
COMPARE = {
    "gpt2": dict(model_type="gpt2", vocab_size=8192, n_embd=256, n_layer=8, n_head=8, n_positions=1024,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    "llama": dict(model_type="llama", vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True),
}
QUICK = {
    "gpt2": dict(COMPARE["gpt2"], vocab_size=256, n_embd=64, n_layer=4, n_head=4),
    "llama": dict(COMPARE["llama"], vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
}


def hf_model(shape: dict, dtype=torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(shape)
    cfg = AutoConfig.for_model(shape.pop("model_type"), **shape)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


# -- the hand-written path of before (longmem/backbone.py up to issue 17), for the comparison only ---------


def _heads(x, head_dim):
    B, T, _ = x.shape
    return x.view(B, T, -1, head_dim).transpose(1, 2)  # (B, H, T, Dh)


def _merge(x):
    B, H, T, Dh = x.shape
    return x.transpose(1, 2).reshape(B, T, H * Dh)


class _OldBackbone(nn.Module):
    """The old per-family code (GPT-2 and Llama), with the interface LongMem's forward and the Decoder use."""

    def __init__(self, new):
        super().__init__()
        self.new = new  # the adapter's backbone: same weights, identity, sizes
        self.model, self.blocks, self.norm, self.lm_head = new.model, new.blocks, new.norm, new.lm_head
        for k in ("num_layers", "vocab_size", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "scale",
                  "max_positions", "sliding_window", "name", "model_type"):
            setattr(self, k, getattr(new, k))
        self.gpt2 = new.model_type == "gpt2"

    def fingerprint(self):
        return self.new.fingerprint()

    def logits(self, h, norm=None):
        return self.lm_head((norm or self.norm)(h))

    def rotary(self, x, positions):
        return None if self.gpt2 else self.model.model.rotary_emb(x, positions.expand(x.shape[0], -1))

    def qkv(self, block, x, rope):
        if self.gpt2:
            q, k, v = block.attn.c_attn(x).split(x.shape[-1], dim=2)
            q, k, v = (_heads(t, self.head_dim) for t in (q, k, v))
            return q, k, v, q, k
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        a = block.self_attn
        q, k, v = (_heads(p(x), self.head_dim) for p in (a.q_proj, a.k_proj, a.v_proj))
        q_rot, k_rot = apply_rotary_pos_emb(q, k, *rope)
        return q_rot, k_rot, v, q, k

    def block_forward(self, block, x, rope, core):
        if self.gpt2:
            attn = block.attn
            x = x + attn.resid_dropout(attn.c_proj(_merge(core(*self.qkv(block, block.ln_1(x), rope)))))
            return x + block.mlp(block.ln_2(x))
        x = x + block.self_attn.o_proj(_merge(core(*self.qkv(block, block.input_layernorm(x), rope))))
        return x + block.mlp(block.post_attention_layernorm(x))

    def forward(self, input_ids, memory_layer, positions=None, cache=None, upto=None, memory_core=None):
        with torch.no_grad():
            T = input_ids.shape[1]
            if positions is None:
                start = len(cache) if cache is not None else 0
                positions = torch.arange(start, start + T, device=input_ids.device)
            positions = positions.view(1, -1)
            t = self.model.transformer if self.gpt2 else self.model.model
            h = t.drop(t.wte(input_ids) + t.wpe(positions)) if self.gpt2 else t.embed_tokens(input_ids)
            rope = self.rotary(h, positions)
            hidden, saved, scale = [h], {}, self.scale

            def core_for(i):
                def core(q, k, v, q_raw, k_raw):
                    if i == memory_layer:
                        saved["kv"] = (k_raw, v)
                    if cache is not None:
                        k, v = cache.update(i, k, v, k_raw if i == memory_layer else None)
                    return causal_attention(q, k, v, scale=scale)

                return core

            for i, block in enumerate(self.blocks):
                h = self.block_forward(block, h, rope, core_for(i))
                hidden.append(h)
        out = BackboneOutput(hidden_states=hidden, keys=saved["kv"][0], values=saved["kv"][1])
        out.layer_inputs = rope  # the old SideNet takes the rotary tables in this slot
        return out


class _OldSideNet(nn.Module):
    """The old SideNet forward over the same blocks (shared with the new model: same weights)."""

    def __init__(self, new):
        super().__init__()
        self.new = new
        self.blocks, self.norm, self.gate = new.blocks, new.norm, new.gate
        self.num_layers, self.memory_index, self._residual_from = new.num_layers, new.memory_index, new._residual_from

    def forward(self, backbone, hidden, rope, retrieve=None, cache=None):
        scale = backbone.scale

        def core_for(i):
            use_memory = i == self.memory_index and retrieve is not None

            def core(q, k, v, q_raw, k_raw):
                if cache is not None:
                    k, v = cache.update(i, k, v)
                if not use_memory:
                    return causal_attention(q, k, v, scale=scale)
                mem = retrieve(q_raw)
                return joint_attention(q, k, v, mem.keys, mem.values, self.gate, mem.mask, mem_q=q_raw, scale=scale)

            return core

        x = hidden[0]
        for i, block in enumerate(self.blocks):
            lo, hi = self._residual_from[i]
            x = backbone.block_forward(block, x, rope, core_for(i)) + (hidden[hi] - hidden[lo])
        return backbone.logits(x, norm=self.norm)


def old_model(new: LongMem) -> LongMem:
    return LongMem(_OldBackbone(new.backbone), new.config, sidenet=_OldSideNet(new.sidenet))


def interleaved(fn_new, fn_old, args) -> tuple[list[float], list[float]]:
    """Warm-up, then new, old, new, old, ...: on a shared machine the load drifts, and pairs see the same load."""
    for _ in range(args.warmup):
        fn_new()
        fn_old()
    t_new, t_old = [], []
    for _ in range(args.repeats):
        for fn, acc in ((fn_new, t_new), (fn_old, t_old)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return t_new, t_old


# -- (a) new vs old --------------------------------------------------------------------------------------


def compare(args) -> list[dict]:
    shapes = QUICK if args.quick else COMPARE
    B, T, gen = (2, 32, 8) if args.quick else (4, 256, 32)
    rows = []
    for name, shape in shapes.items():
        torch.manual_seed(0)
        cfg = LongMemConfig(chunk_size=4, memory_size=4096, topk_chunks=4, segment_length=T)
        new = LongMem.from_backbone(hf_model(shape), cfg).eval()
        with torch.no_grad():
            new.sidenet.gate.fill_(1.0)
        old = old_model(new)
        seg = [torch.randint(0, shape["vocab_size"], (B, T)) for _ in range(4)]
        mem_new, mem_old = new.new_memory(B), old.new_memory(B)
        with torch.no_grad():
            for s in seg[:3]:
                a, b = new(s, memory=mem_new).logits, old(s, memory=mem_old).logits
        agree = float((a - b).abs().max())
        assert agree < 1e-4, f"{name}: old and new paths disagree by {agree}"

        def forward(model, mem):
            return lambda: model(seg[3], memory=mem, update_memory=False)

        def step(model, mem):
            opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)

            def run():
                model.train()
                loss = model(seg[3], memory=mem, labels=seg[3], update_memory=False).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                model.eval()

            return run

        def generate(model, mem):
            def run():
                dec = Decoder(model, B, mem, window=T)
                dec.feed(seg[3][:, : T // 2])
                tok = seg[3][:, :1]
                for _ in range(gen):
                    tok = dec.feed(tok, check=False).argmax(-1, keepdim=True)

            return run

        for what, make, tokens in (("forward", forward, B * T), ("adaptation_step", step, B * T), ("generation", generate, B * gen)):
            with torch.set_grad_enabled(what == "adaptation_step"):
                t_new, t_old = interleaved(make(new, mem_new), make(old, mem_old), args)  # same weights and memory
            ratios = [o / n for n, o in zip(t_new, t_old)]
            rows.append({"shape": name, "what": what, "new_ms": round(1e3 * statistics.median(t_new), 2),
                         "old_ms": round(1e3 * statistics.median(t_old), 2),
                         "ratio_old_over_new": round(statistics.median(ratios), 3),
                         "ratios": [round(r, 3) for r in ratios], "tokens": tokens, "max_logit_diff": agree})
            r = rows[-1]
            print(f"{name:6s} {what:16s} new {r['new_ms']:8.1f} ms  old {r['old_ms']:8.1f} ms  old/new {r['ratio_old_over_new']:.3f} "
                  f"(pairs: {', '.join(f'{x:.2f}' for x in ratios)})", flush=True)
    return rows


# -- (b) real shapes ---------------------------------------------------------------------------------------


def real_one(name: str, dtype_name: str, T: int, repeats: int) -> dict:
    """In a child process: one (model, dtype) figure set."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    torch.manual_seed(0)
    t0 = time.time()
    hf = hf_model(REAL[name], dtype)
    build_s = time.time() - t0
    ids = torch.randint(0, REAL[name]["vocab_size"], (1, T))
    with torch.no_grad():
        hf(ids)
        t0 = time.perf_counter()
        for _ in range(repeats):
            hf(ids)
        hf_s = (time.perf_counter() - t0) / repeats
    rss_hf = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = LongMem.from_backbone(hf, LongMemConfig(memory_size=65536, segment_length=T)).eval()
    mem = model.new_memory(1)
    with torch.no_grad():
        model(ids, memory=mem)
        model(ids, memory=mem)
        t0 = time.perf_counter()
        for _ in range(repeats):
            model(ids, memory=mem, update_memory=False)
        lm_s = (time.perf_counter() - t0) / repeats
    stored = mem.num_tokens(0)
    per_token = (2 * model.backbone.num_kv_heads * model.backbone.head_dim * mem.keys.element_size()
                 + model.backbone.num_kv_heads * model.backbone.head_dim * mem.keys.element_size() / model.config.chunk_size)
    params = sum(p.numel() for p in hf.parameters())
    side = sum(p.numel() for p in model.sidenet.parameters())
    return {"model": name, "dtype": dtype_name, "tokens": T, "backbone_params_M": round(params / 1e6, 1),
            "sidenet_params_M": round(side / 1e6, 1), "build_s": round(build_s, 1),
            "backbone_tok_per_s": round(T / hf_s, 1), "longmem_tok_per_s": round(T / lm_s, 1),
            "longmem_over_backbone_time": round(lm_s / hf_s, 3), "peak_rss_backbone_mib": round(rss_hf),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "memory_bytes_per_token": per_token, "memory_bank_mib_allocated": round(mem.nbytes() / 2**20, 1),
            "stored_tokens": stored}


def real(args) -> list[dict]:
    names = ["SmolLM2-360M"] if args.quick else list(REAL)
    T, repeats = (32, 1) if args.quick else (128, 2)
    rows = []
    for name in names:
        for dt in ("fp32", "bf16"):
            cmd = [sys.executable, __file__, "--child", name, dt, str(T), str(repeats)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
            if out.returncode:
                print(out.stderr[-2000:], file=sys.stderr)
                rows.append({"model": name, "dtype": dt, "error": out.stderr.strip().splitlines()[-1][:300]})
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{name:13s} {dt}  backbone {r['backbone_tok_per_s']:7.1f} tok/s  longmem {r['longmem_tok_per_s']:7.1f} tok/s "
                  f"({r['longmem_over_backbone_time']:.2f}x time)  peak RSS {r['peak_rss_mib']} MiB "
                  f"(backbone alone {r['peak_rss_backbone_mib']})  memory {r['memory_bytes_per_token']:.0f} B/token", flush=True)
    return rows


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        name, dt, T, repeats = sys.argv[2:6]
        print(json.dumps(real_one(name, dt, int(T), int(repeats))))
        return 0
    p = parser("families", __doc__, full_repeats=5)
    p.add_argument("--part", choices=["compare", "real", "all"], default="all")
    args = parse(p, argv)
    setup(args)
    import transformers

    transformers.logging.set_verbosity_error()
    result = {"benchmark": "families", "mode": args.mode, "argv": args.argv, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "load_avg_1m_start": args.load_at_start, "cpu": os.cpu_count()}
    if args.part in ("compare", "all"):
        result["compare"] = compare(args)
    if args.part in ("real", "all"):
        result["real"] = real(args)
    path = Path(args.json or (RESULTS / ("quick" if args.quick else "") / "families.json"))
    path.parent.mkdir(parents=True, exist_ok=True)
    if args.part != "all" and path.is_file():  # one part rerun: keep the other part's figures (with their own date)
        before = json.loads(path.read_text())
        for part in {"compare", "real"} - {args.part}:
            if part in before:
                result[part], result[f"{part}_measured"] = before[part], before.get(f"{part}_measured", before.get("date_utc"))
    result[f"{args.part}_measured" if args.part != "all" else "date_utc"] = result["date_utc"]
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
