"""Generation: decoding speed with and without memory, KV-cached against recomputing the window.

Greedy decoding of ``--new-tokens`` tokens after a ``--prompt``-token prompt, B rows, with
``longmem.generation.Decoder`` (what ``model.generate`` runs: backbone and SideNet KV caches, one
token's forward per step, retrieval for that token only):

    kv cache, no memory        memory=None: the same model with its memory branch off
    kv cache, empty memory     a memory bank with nothing stored
    kv cache, full memory      a bank holding ``--memory-size`` tokens per row (65,536 by default)
    recompute, full memory     the official code's way: for each new token, ``model(window)`` from
                               scratch over the whole local window, retrieving for every window token
    recompute, no memory       the same without memory
    linears only (floor)       not a decoder: every nn.Linear of the model (backbone, SideNet, LM head) applied
                               once to B single-token rows, back to back; what the weights alone cost per
                               token on this machine, the floor under any decode loop of this model

Prefill (feeding the prompt) is timed apart; tokens/s counts decoded tokens only (B x new tokens /
decode time). The prompt plus the new tokens stay within the window (no slide), so every step costs
the same. Recompute decodes fewer tokens (``--recompute-tokens``) since each costs a whole window.

    python benchmarks/generation.py            # full: default-model shape, B 1, prompt 512, 128 new tokens, 65K memory
    python benchmarks/generation.py --quick    # seconds
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402


def build_parser():
    p = common.parser("generation", __doc__)
    p.add_argument("--batch", type=int, default=1, help="rows B decoded together (default 1)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512; quick 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens decoded with the KV cache (default 128; quick 16)")
    p.add_argument("--recompute-tokens", type=int, default=None, help="tokens decoded by recomputing (default 16; quick 4)")
    p.add_argument("--memory-size", type=int, default=None, help="tokens in the full memory per row (default 65536; quick 4096)")
    p.add_argument("--window", type=int, default=None, help="local window W (default: the model's segment length, 1024; quick 128)")
    return p


def main(argv=None) -> dict:
    args = common.parse(build_parser(), argv)
    device = common.setup(args)
    started = time.perf_counter()
    from longmem.generation import Decoder

    B = args.batch
    P = args.prompt or (64 if args.quick else 512)
    N = args.new_tokens or (16 if args.quick else 128)
    R = args.recompute_tokens or (4 if args.quick else 16)
    M = args.memory_size or (4096 if args.quick else 65536)
    W = args.window or (128 if args.quick else None)
    model, shape = common.make_model(args, device, memory_size=M, **({"segment_length": W} if W else {}))
    model.eval()
    W = model.segment_length
    if P + max(N, R) > W:
        sys.exit(f"--prompt {P} + new tokens {max(N, R)} exceed the window {W}: the window would slide mid-run")
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, shape["vocab"], (B, P), generator=g).to(device)
    full_memory = model.new_memory(B)
    common.fill_memory(full_memory, M, seed=args.seed)

    def kv_case(memory_fn):
        """(prefill seconds, decode seconds) for one generation with a fresh decoder."""
        memory = memory_fn()
        dec = Decoder(model, B, memory, window=W)
        common.sync(device)
        t0 = time.perf_counter()
        logits = dec.feed(prompt)
        common.sync(device)
        t1 = time.perf_counter()
        for _ in range(N):
            logits = dec.feed(logits.argmax(-1).view(B, 1))
        common.sync(device)
        return t1 - t0, time.perf_counter() - t1

    @torch.no_grad()
    def recompute_case(memory):
        window = prompt
        common.sync(device)
        t0 = time.perf_counter()
        for _ in range(R):
            logits = model(window[:, -W:], memory=memory, update_memory=False).logits[:, -1]  # (B, V)
            window = torch.cat([window, logits.argmax(-1).view(B, 1)], dim=1)
        common.sync(device)
        return time.perf_counter() - t0

    floor_model = common.LinearsFloor([model], B, device)

    def linears_case():
        common.sync(device)
        t0 = time.perf_counter()
        for _ in range(N):
            floor_model.token()
        common.sync(device)
        return time.perf_counter() - t0

    cases = {"kv cache, no memory": lambda: None, "kv cache, empty memory": lambda: model.new_memory(B),
             "kv cache, full memory": lambda: full_memory}
    rows, results = [], {}
    for _ in range(args.warmup):
        for fn in cases.values():
            kv_case(fn)
        recompute_case(full_memory)
        linears_case()
    # interleaved repeats: load drift hits all cases alike
    samples = {name: ([], []) for name in cases}
    recompute = {"recompute, full memory": [], "recompute, no memory": []}
    floor = []
    for _ in range(args.repeats):
        for name, fn in cases.items():
            pre, dec = kv_case(fn)
            samples[name][0].append(pre)
            samples[name][1].append(dec)
        recompute["recompute, full memory"].append(recompute_case(full_memory))
        recompute["recompute, no memory"].append(recompute_case(None))
        floor.append(linears_case())
    assert all(full_memory.num_tokens(b) == M for b in range(B)), "decoding within the window must not write memory"
    for name, (pre, dec) in samples.items():
        d, p = common.summarize(dec), common.summarize(pre)
        results[name] = B * N / d["median_s"]
        rows.append({"case": name, "tokens": B * N, "tok_per_s": results[name], "ms_per_token": d["median_s"] / N * 1e3,
                     "min_ms_per_token": d["min_s"] / N * 1e3, "prefill_ms": p["median_s"] * 1e3})
    for name, times in recompute.items():
        d = common.summarize(times)
        results[name] = B * R / d["median_s"]
        rows.append({"case": name, "tokens": B * R, "tok_per_s": results[name], "ms_per_token": d["median_s"] / R * 1e3,
                     "min_ms_per_token": d["min_s"] / R * 1e3})
    d = common.summarize(floor)
    results["linears only (floor)"] = B * N / d["median_s"]
    rows.append({"case": "linears only (floor)", "tokens": B * N, "tok_per_s": results["linears only (floor)"],
                 "ms_per_token": d["median_s"] / N * 1e3, "min_ms_per_token": d["min_s"] / N * 1e3})
    base = results["kv cache, no memory"]
    for r in rows:
        r["vs_no_memory"] = r["tok_per_s"] / base
    targets = [
        common.target(f"kv cache: {M:,}-token memory / no memory (tok/s)", results["kv cache, full memory"] / base, ">=", 0.7),
        common.target("kv cache / recompute, full memory (tok/s)",
                      results["kv cache, full memory"] / results["recompute, full memory"], ">=", 5.0,
                      f"window {P}..{P + R} tokens recomputed per step"),
    ]
    config = {"linears": len(floor_model.linears), "linear_weight_mb": floor_model.weight_bytes / 2**20,
              "batch": B, "prompt": P, "new_tokens": N, "recompute_tokens": R, "memory_size_per_row": M, "window": W,
              "retrieval_backend": full_memory._backend(), "decoding": "greedy", "model": shape}
    return common.finish(args, "generation", config, rows, targets,
                         ["case", "tokens", "tok_per_s", "ms_per_token", "min_ms_per_token", "prefill_ms", "vs_no_memory"],
                         started)


if __name__ == "__main__":
    main()
