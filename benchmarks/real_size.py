"""Real size: the shipped model over SmolLM2-135M-Instruct, every path against the backbone, in one run.

The model is ``smollm2-135m-longmem`` (30-layer backbone, 15 memory-delta-start SideNet blocks, memory layer m = 21,
window 512); the reference is the same backbone run by transformers itself (a copy of the same weights, its
default attention), on the same tokens, timed in the same rounds (interleaved, so load drift hits both alike).
Each precision (fp32; bf16: weights in bf16, training under bf16 autocast with an fp32 SideNet, as
``longmem train --dtype bf16``) and memory size (16,384 and 65,536 tokens, Gaussian keys: exact search costs the
same whatever the keys) in turn:

    ingest       ``longmem.store.ingest_file`` (tokenize, backbone to block m, write)   | HF forward, all layers, same ids
    window       ``model(window, memory=)`` over one full window, with a full memory     | HF forward of the window;
                 and without memory                                                      |   (ratio: time / HF's)
    decode       ``generate_stream`` (Decoder: KV caches, retrieval per token) with a     | ``model.generate`` of the HF copy
                 full memory, without memory, and ``PlainBackbone`` through the same       |   (its own KV cache), greedy,
                 Decoder; ms per token after the first (prefill apart)                   |   the same prompt and length
                 linears only (floor): not a decoder; every nn.Linear a LongMem token runs (the backbone's, the
                 SideNet blocks not skipped, the LM head) applied once to one row: the weights' cost alone
    adaptation   ``train_step`` on a ``MicroBatch`` with its own memory (``longmem adapt``'s path; AdamW, clipping
                 and autocast of ``longmem train``), for each training configuration, at segments 256 and 512:
                   full          the whole SideNet trains (every alpha too, so no block is skipped)
                   from-j        blocks j.. (and their alphas, the gate, the final norm); blocks below j skipped
                   lora          peft adapters on every block's linear layers (``--lora-rank``); norms, alphas, gate
                   block-j       the shipped recipe (``adapt.trainable_names``): block j, alpha_j, the gate; the
                                 other blocks, alpha 0 and frozen, are skipped
                   full+ckpt     full, with gradient checkpointing of the SideNet blocks
                   block-j / from-j, 8 tokens scored: a recall example (only the answer's last 8 tokens scored,
                                 ``MicroBatch.scored_only``: the LM head runs only there)
                                                                                         | a full fine-tuning step of the
                                                                                         |   backbone (same batch, same
                                                                                         |   optimizer); HF forward, no grad
    llama.cpp    decode on the same GGUF file (Q4_1) when ``llama_cpp`` imports; otherwise a skip with its reason

``--profile`` runs torch.profiler over ``--profile-steps`` adaptation steps of each configuration (each
precision, longest segment, largest memory) and writes the top operators to ``<json stem>_profile.txt``.
Not in ``run_all.py``: it loads a 135M model several times over and takes minutes.

    python benchmarks/real_size.py            # full: the shipped SmolLM2 model (about 12-18 min on 2 idle cores)
    python benchmarks/real_size.py --quick    # seconds: a tiny random identity-start model, every path
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
import ingest as ingest_bench  # noqa: E402  (the document and the tokenizer, as ingest.py makes them)

CONFIGS = ("full", "from-j", "lora", "block-j", "full+ckpt")
SCORED = 8  # answer tokens scored in the recall-example cases ("block-j, 8 tokens scored")


def build_parser():
    p = common.parser("real_size", __doc__, full_repeats=3)
    p.add_argument("--parts", nargs="+", default=["ingest", "window", "decode", "adaptation", "llama.cpp"],
                   choices=["ingest", "window", "decode", "adaptation", "llama.cpp"])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--memories", nargs="+", type=int, default=None, help="memory tokens per row (default 16384 65536; quick 1024 4096)")
    p.add_argument("--segments", nargs="+", type=int, default=None, help="adaptation segment lengths (default 256 512; quick 32 64)")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS, help="adaptation training configurations")
    p.add_argument("--batch", type=int, default=1, help="rows B (adaptation; `longmem adapt` uses 1 per micro-batch)")
    p.add_argument("--ingest-tokens", type=int, default=None, help="document length for ingest (default 4096; quick 512)")
    p.add_argument("--prompt", type=int, default=None, help="decode: prompt tokens (default 256; quick 32)")
    p.add_argument("--new-tokens", type=int, default=None, help="decode: tokens generated (default 32; quick 8)")
    p.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 16; quick 4); alpha 2 x rank as `longmem train`")
    p.add_argument("--text", default=None, help="a UTF-8 text file for the document (default: stdlib sources)")
    p.add_argument("--profile", action="store_true", help="torch.profiler over a few adaptation steps of each configuration")
    p.add_argument("--profile-steps", type=int, default=3)
    return p


def main(argv=None) -> dict:
    args = common.parse(build_parser(), argv)
    device = common.setup(args)
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    from longmem.backbone import to_dtype
    from longmem.loading import SMOLLM2_MODEL

    if args.model is None and not args.quick:
        args.model = str(SMOLLM2_MODEL)
    sizes = dict(memories=args.memories or ([1024, 4096] if args.quick else [16384, 65536]),
                 segments=args.segments or ([32, 64] if args.quick else [256, 512]),
                 ingest_tokens=args.ingest_tokens or (512 if args.quick else 4096),
                 prompt=args.prompt or (32 if args.quick else 256), new_tokens=args.new_tokens or (8 if args.quick else 32),
                 lora_rank=args.lora_rank or (4 if args.quick else 16), batch=args.batch)
    overrides = {} if args.model else {"sidenet_init": "identity", "segment_length": 128, "memory_size": max(sizes["memories"])}
    base, shape = common.make_model(args, device, **overrides)
    base.eval()
    W = base.segment_length
    if sizes["prompt"] + sizes["new_tokens"] > W:
        sys.exit(f"--prompt {sizes['prompt']} + --new-tokens {sizes['new_tokens']} exceed the window {W}")
    if max(sizes["segments"]) > base.backbone.max_positions:
        sys.exit(f"--segments {max(sizes['segments'])} exceeds the backbone's context {base.backbone.max_positions}")
    tmp = tempfile.TemporaryDirectory(prefix="longmem-real-size-")
    tokenizer = ingest_bench.load_or_train_tokenizer(args, base, Path(tmp.name))
    want = max(sizes["ingest_tokens"], max(sizes["segments"]) + 1, sizes["prompt"])
    doc, tokens = ingest_bench.write_document(tokenizer, want, args.text, Path(tmp.name))
    ids = torch.from_numpy(tokens).view(1, -1).to(device)  # (1, n) real text: prompts and batches come from it

    rows, targets, trained, profile_text = [], [], [], []
    per_token = {}  # (precision, case) -> seconds per decoded token, for llama.cpp's ratio
    for precision in args.precisions:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        amp = common.autocast_dtype(precision, device)  # None for fp32; bf16 autocast for bf16
        model = base if precision == "fp32" else to_dtype(copy.deepcopy(base), dtype)
        hf = hf_copy(base, dtype)
        banks = {M: full_bank(model, M, sizes["batch"], args.seed) for M in sizes["memories"]}
        where = dict(precision=precision)
        if "ingest" in args.parts:
            new = ingest_rows(args, model, hf, tokenizer, doc, ids, where)
            rows += new
            targets.append(common.target(f"{precision}: ingest throughput / HF forward throughput",
                                         1 / new[0]["ratio"], ">=", 0.8, "as benchmarks/ingest.py"))
        if "window" in args.parts:
            rows += window_rows(args, model, hf, banks, ids[:, :W], where)
        if "decode" in args.parts:
            new = decode_rows(args, model, hf, banks, ids[:, :sizes["prompt"]], sizes["new_tokens"], where)
            rows += new
            per_token.update({(precision, r["case"]): r["median_ms"] / 1e3 for r in new})
            M = max(sizes["memories"])
            with_memory = next(r for r in new if r["case"] == f"longmem, {M:,}-token memory")
            no_memory = next(r for r in new if r["case"] == "longmem, no memory")
            targets.append(common.target(f"{precision}: decode, {M:,}-token memory / no memory (tok/s)",
                                         with_memory["tok_per_s"] / no_memory["tok_per_s"], ">=", 0.7,
                                         f"{1 / with_memory['ratio']:.2f}x HF generate's tok/s"))
        if "adaptation" in args.parts:
            new, info, prof = adaptation_rows(args, model, base, hf, banks, ids, sizes, amp, where, device)
            rows += new
            trained += info
            profile_text += prof
            T, M = max(sizes["segments"]), max(sizes["memories"])
            recipe = [r for r in new if r["case"] == "block-j" and r["segment"] == T and r["memory"] == M]
            if recipe:
                targets.append(common.target(f"{precision}: adaptation step (block-j, T {T}, {M:,} memory) / full fine-tuning",
                                             recipe[0]["ratio"], "<=", 1.0, "as benchmarks/adaptation_step.py"))
        del model, hf, banks
        gc.collect()

    skipped = []
    if "llama.cpp" in args.parts:
        new, why = llama_cpp_rows(args, ids[:, :sizes["prompt"]], sizes["new_tokens"], per_token)
        rows += new
        if why:
            skipped.append({"part": "llama.cpp", "reason": why})
            print(f"llama.cpp: skipped ({why})", file=sys.stderr)
    tmp.cleanup()

    profile_path = None
    if profile_text:
        out = Path(args.json) if args.json else common.default_json("real_size", args.quick)
        profile_path = out.with_name(out.stem + "_profile.txt")
        profile_path.parent.mkdir(parents=True, exist_ok=True)
        profile_path.write_text("\n\n".join(profile_text) + "\n")
        print(f"wrote {profile_path}")
    config = {**sizes, "window": W, "document_tokens": len(tokens), "document": args.text or "stdlib sources",
              "precisions": args.precisions, "parts": args.parts, "configs": args.configs,
              "retrieval_backend": base.new_memory(1, memory_size=base.config.chunk_size)._backend(), "model": shape,
              "load_avg_start": load_start, "load_avg_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    return common.finish(args, "real_size", config, rows, targets,
                         ["part", "case", "precision", "memory", "segment", "median_ms", "min_ms", "tok_per_s", "ratio", "vs"],
                         started, extra={"training_configs": trained, "skipped": skipped,
                                         "profile": str(profile_path) if profile_path else None})


# -- models -----------------------------------------------------------------------------------------


def hf_copy(model, dtype):
    """The backbone as transformers runs it: a copy of the same weights with its default attention (the LongMem
    backbone's own HF model is switched to LongMem's attention function, and falls back to eager outside it)."""
    from longmem.backbone import to_dtype

    hf = copy.deepcopy(model.backbone.model)
    hf.set_attn_implementation("sdpa")
    hf.config.use_cache = True
    return to_dtype(hf, dtype).eval()


def full_bank(model, M: int, B: int, seed: int):
    bank = model.new_memory(B, memory_size=M)  # in the model's dtype, as `longmem train` stores it (autocast's)
    common.fill_memory(bank, M, seed=seed)
    return bank


def training_model(base, backbone, name: str, lora_rank: int):
    """A LongMem over ``backbone`` with a fresh fp32 copy of ``base``'s SideNet, set to train as ``name`` says."""
    from longmem import LongMem
    from longmem.training.adapt import trainable_names
    from longmem.training.scale import add_lora

    sidenet = copy.deepcopy(base.sidenet).float()
    model = LongMem(backbone, base.config, sidenet=sidenet)
    j = sidenet.memory_index
    if name == "lora":
        add_lora(sidenet, lora_rank, 2.0 * lora_rank)  # as `longmem train --lora-rank`
    else:
        names = [n for n, _ in sidenet.named_parameters()]
        train = {"full": set(names), "full+ckpt": set(names), "block-j": set(trainable_names(model)),
                 "from-j": {n for n in names if (_block_of(n) is None or _block_of(n) >= j)}}[name]
        for n, p in sidenet.named_parameters():
            p.requires_grad_(n in train)
    sidenet.grad_checkpointing = name == "full+ckpt"
    return model.train()


def _block_of(name: str) -> int | None:
    """The SideNet block a parameter belongs to ("blocks.3.mlp..." or "scales.3"), None for the gate and norm."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] in ("blocks", "scales") else None


# -- the parts ------------------------------------------------------------------------------------


def row(part, case, where, stats, tokens, ref_s, vs, memory=0, segment=0, **extra) -> dict:
    """A result row: times in ms (medians), tokens per second, and ``ratio`` = this median / the reference's."""
    return {"part": part, "case": case, **where, "memory": memory, "segment": segment,
            "median_ms": stats["median_s"] * 1e3, "min_ms": stats["min_s"] * 1e3, "max_ms": stats["max_s"] * 1e3,
            "tok_per_s": tokens / stats["median_s"], "ratio": stats["median_s"] / ref_s, "vs": vs, **extra}


def ingest_rows(args, model, hf, tokenizer, doc, ids, where) -> list[dict]:
    from longmem.store import ingest_file

    n, T, csz = ids.shape[1], model.segment_length, model.config.chunk_size
    written = {}

    def ingest():
        bank = model.new_memory(1, memory_size=-(-n // csz) * csz)
        written["n"] = ingest_file(model, tokenizer, bank, doc)

    @torch.no_grad()
    def hf_forward():  # the same ids, all layers, no LM head, window by window
        for start in range(0, n, T):
            hf.base_model(ids[:, start:start + T], use_cache=False)

    stats = common.interleaved({"ingest_file": ingest, "hf": hf_forward}, args)
    ref = stats["hf"]["median_s"]
    vs = "HF forward, all layers"
    return [row("ingest", "longmem ingest_file", where, stats["ingest_file"], written["n"], ref, vs, written=written["n"]),
            row("ingest", "HF forward, all layers", where, stats["hf"], n, ref, vs)]


def window_rows(args, model, hf, banks, window, where) -> list[dict]:
    B, T = window.shape
    cases = {f"longmem, {M:,}-token memory": _forward(model, window, bank) for M, bank in banks.items()}
    cases["longmem, no memory"] = _forward(model, window, None)
    cases["HF forward (logits)"] = torch.no_grad()(lambda: hf(window, use_cache=False))
    stats = common.interleaved(cases, args)
    ref = stats["HF forward (logits)"]["median_s"]
    memory = {f"longmem, {M:,}-token memory": M for M in banks}
    return [row("window", name, where, s, B * T, ref, "HF forward", memory=memory.get(name, 0), segment=T)
            for name, s in stats.items()]


def _forward(model, window, bank):
    @torch.no_grad()
    def run():
        model(window, memory=bank, update_memory=False)

    return run


def decode_rows(args, model, hf, banks, prompt, N: int, where) -> list[dict]:
    """Greedy decoding of N tokens after ``prompt``: per-token time after the first token (its prefill apart)."""
    from longmem.baselines import PlainBackbone
    from longmem.generation import SamplingConfig, generate_stream

    device = prompt.device
    cfg = SamplingConfig(max_new_tokens=N)

    def longmem(m, bank):
        def run():
            stamps = [_now(device)]
            for _ in generate_stream(m, prompt, bank, cfg):
                stamps.append(_now(device))
            return stamps

        return run

    class Stamps:  # a transformers streamer: ``put`` is called with the prompt, then with each new token
        def __init__(self):
            self.t = []

        def put(self, value):
            self.t.append(_now(device))

        def end(self):
            pass

    def hf_generate():
        s = Stamps()
        hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, min_new_tokens=N, do_sample=False,
                    streamer=s, pad_token_id=0, eos_token_id=None)
        return s.t

    # the floor: the weights a LongMem token reads, as matrix-vector products and nothing else
    with torch.no_grad():
        skipped = model.sidenet.skipped_blocks()
    blocks = [b for i, b in enumerate(model.sidenet.blocks) if i not in skipped]
    floor = common.LinearsFloor([model.backbone.model, *blocks], 1, device)

    def linears_only():
        stamps = [_now(device)]
        for _ in range(N):
            floor.token()
            stamps.append(_now(device))
        return stamps

    cases = {f"longmem, {M:,}-token memory": longmem(model, bank) for M, bank in banks.items()}
    cases["longmem, no memory"] = longmem(model, None)
    cases["PlainBackbone (same Decoder)"] = longmem(PlainBackbone(model), None)
    cases["HF generate (KV cache)"] = hf_generate
    cases["linears only (floor)"] = linears_only
    per_token, prefill = _stamped_rounds(cases, args, N)
    ref = per_token["HF generate (KV cache)"]["median_s"]
    memory = {f"longmem, {M:,}-token memory": M for M in banks}
    return [row("decode", name, where, s, 1, ref, "HF generate", memory=memory.get(name, 0), segment=prompt.shape[1],
                prefill_ms=prefill[name]["median_s"] * 1e3, new_tokens=N,
                **({"linears": len(floor.linears), "weight_mb": floor.weight_bytes / 1e6} if name == "linears only (floor)" else {}))
            for name, s in per_token.items()]


def _now(device) -> float:
    common.sync(device)
    return time.perf_counter()


def _stamped_rounds(cases, args, N: int):
    """Interleaved rounds of cases that return timestamps [start, token 1, ..., token N]: per-token seconds after
    the first token, and the prefill (start to token 1)."""
    for _ in range(args.warmup):
        for fn in cases.values():
            fn()
    per_token, prefill = {n: [] for n in cases}, {n: [] for n in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t = fn()
            assert len(t) == N + 1, f"{name}: {len(t) - 1} tokens, wanted {N}"
            prefill[name].append(t[1] - t[0])
            per_token[name].append((t[-1] - t[1]) / max(1, N - 1))
    return ({n: common.summarize(v) for n, v in per_token.items()}, {n: common.summarize(v) for n, v in prefill.items()})


def adaptation_rows(args, model, base, hf, banks, ids, sizes, amp, where, device):
    """One optimizer step per configuration and memory, interleaved with the references, for each segment."""
    from longmem.model import IGNORE
    from longmem.training.step import MicroBatch, train_step
    from longmem.training.config import OptimConfig
    from longmem.training.train import make_optimization

    settings = OptimConfig(lr=1e-5)
    B = sizes["batch"]
    models, info = {}, []
    for name in args.configs:
        try:
            m = training_model(base, model.backbone, name, sizes["lora_rank"])
        except Exception as e:  # noqa: BLE001 - LoRA without peft: say so and go on
            print(f"adaptation {name}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
            continue
        with torch.enable_grad():
            skipped = sorted(m.sidenet.skipped_blocks())
        models[name] = (m, make_optimization(settings, 10**9, m.trainable_parameters(), amp))
        info.append({"precision": where["precision"], "config": name, "trainable_params": sum(p.numel() for p in m.trainable_parameters()),
                     "skipped_blocks": skipped, "sidenet_blocks": m.sidenet.num_layers,
                     "grad_checkpointing": m.sidenet.grad_checkpointing})
    full = hf_copy(base, torch.float32).train().requires_grad_(True)  # fp32 weights; bf16 runs under autocast
    full.config.use_cache = False
    optim_full = make_optimization(settings, 10**9, list(full.parameters()), amp)
    rows, profiles = [], []
    for T in sizes["segments"]:
        seq = ids[:, :T + 1].expand(B, -1)
        batch = MicroBatch(seq[:, :-1], seq[:, 1:])  # every token scored

        def step(m, optim, bank):
            return lambda: train_step(m, [MicroBatch(batch.input_ids, batch.targets, memory=bank)], optim)

        cases = {(name, M): step(m, optim, bank) for name, (m, optim) in models.items() for M, bank in banks.items()}
        # a recall example of `longmem adapt`: only the answer's tokens scored, so the LM head runs only there
        answer = batch.targets.clone()
        answer[:, :-SCORED] = IGNORE
        for name in ("block-j", "from-j"):
            if name in models:
                m, optim = models[name]
                for M, bank in banks.items():
                    cases[(f"{name}, {SCORED} tokens scored", M)] = (
                        lambda m=m, optim=optim, bank=bank: train_step(
                            m, [MicroBatch(batch.input_ids, answer, memory=bank, scored_only=True)], optim))
        cases[("full fine-tuning", 0)] = lambda: train_step(full, [batch], optim_full)
        cases[("HF forward, no grad", 0)] = torch.no_grad()(lambda: hf(batch.input_ids, use_cache=False))
        stats = common.interleaved(cases, args)
        ref = stats[("full fine-tuning", 0)]["median_s"]
        rows += [row("adaptation", name, where, s, B * T, ref, "full fine-tuning step", memory=M, segment=T)
                 for (name, M), s in stats.items()]
        if args.profile and not profiles and T == max(sizes["segments"]):
            M = max(banks)
            for name, (m, optim) in models.items():
                profiles.append(profile_steps(step(m, optim, banks[M]), banks[M], args.profile_steps, device,
                                              f"{name}, {where['precision']}, segment {T}, memory {M:,}"))
    return rows, info, profiles


def profile_steps(fn, bank, steps: int, device, title: str) -> str:
    """torch.profiler over ``steps`` calls of ``fn``: the top operators by self time, as text. The memory's
    ``search`` and ``add`` are labelled (``memory.search``, ``memory.add``): faiss's time is no torch operator."""
    from torch.profiler import ProfilerActivity, profile

    for method in ("search", "add"):  # instance attributes shadow the methods while profiling
        original = getattr(bank, method)
        setattr(bank, method, lambda *a, _f=original, _label=f"memory.{method}", **kw: _labelled(_label, _f, a, kw))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                fn()
    finally:
        del bank.search, bank.add
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"== adaptation step: {title} ({steps} steps; sorted by {key})\n"
            + prof.key_averages().table(sort_by=key, row_limit=25))


def _labelled(label, fn, args, kwargs):
    from torch.profiler import record_function

    with record_function(label):
        return fn(*args, **kwargs)


def llama_cpp_rows(args, prompt, N: int, per_token: dict) -> tuple[list[dict], str | None]:
    """llama.cpp's decode of the same prompt on the backbone's GGUF file; ([], why) when it cannot run here."""
    from longmem.gguf import is_gguf, reference_file
    from longmem.io import read_checkpoint_meta

    if not args.model:
        return [], "the model has random weights: there is no GGUF file to give llama.cpp"
    gguf = reference_file(read_checkpoint_meta(Path(args.model))["backbone"]["path"])
    if not is_gguf(gguf):
        return [], f"the backbone ({gguf}) is not a GGUF file"
    try:
        import llama_cpp
    except ImportError:
        return [], ("llama-cpp-python is not installed: pip install 'longmem[llamacpp]' (it builds llama.cpp from "
                    "source: cmake and a C++ compiler, minutes)")
    try:
        llm = llama_cpp.Llama(model_path=gguf, n_ctx=prompt.shape[1] + N + 8, n_threads=torch.get_num_threads(),
                              verbose=False)
        tokens = prompt[0].tolist()

        def run():
            llm.reset()  # no reuse of the previous run's prefix: the prompt is evaluated every time
            stamps = [time.perf_counter()]
            for _ in llm.generate(tokens, top_k=1, temp=0.0):
                stamps.append(time.perf_counter())
                if len(stamps) == N + 1:
                    break
            return stamps

        per, prefill = _stamped_rounds({"llama.cpp": run}, args, N)
    except Exception as e:  # noqa: BLE001 - an API or build difference: report it as the reason
        return [], f"llama.cpp failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    ref = per_token.get(("fp32", "HF generate (KV cache)"), per["llama.cpp"]["median_s"])
    return [row("decode", "llama.cpp (the GGUF file)", {"precision": "gguf"}, per["llama.cpp"], 1, ref, "HF generate fp32",
                segment=prompt.shape[1], prefill_ms=prefill["llama.cpp"]["median_s"] * 1e3, new_tokens=N,
                gguf=Path(gguf).name)], None


if __name__ == "__main__":
    main()
