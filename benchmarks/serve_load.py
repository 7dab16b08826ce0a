"""Serve load: `longmem serve` under 1, 4 and 16 concurrent clients, and its overhead over in-process calls.

The real server runs in a subprocess (`python -m longmem.cli serve`, longmem-tiny unless --model), with
three memories holding a document each. For each client count, that many threads send requests back to
back for ``--seconds``: a mix of chat completions (``--chat`` share), completions and document adds, each
on a random memory, greedy, ``--new-tokens`` tokens. Per count: requests/s, p50/p99 latency, generated
tokens/s (from ``usage``), errors (transport failures and any non-2xx), 5xx and 429 answers. Afterwards
every acknowledged add is looked up in its memory on disk.

Overhead: one client, the same completion (prompt, memory, new tokens) timed through HTTP and in-process
(``Engine.generate`` on a model loaded here, with the memory read from disk as the server does), the two
interleaved ``--repeats`` times; overhead = median HTTP / median in-process - 1.

    python benchmarks/serve_load.py               # full: 20 s per client count
    python benchmarks/serve_load.py --quick       # 3 s per count
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from longmem.loading import TINY_MODEL, load_model_and_tokenizer  # noqa: E402

PROMPT = "It was a truth universally acknowledged, that a single man in possession of a good fortune"
DOC = ("Mr Darcy lives at Pemberley in Derbyshire. Elizabeth Bennet walks to Netherfield in the rain. "
       "The pass key is 71432.\n") * 10
MEMORIES = ("austen", "notes", "code")


def build_parser():
    p = common.parser("serve_load", __doc__, full_repeats=20)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients (default 1 4 16)")
    p.add_argument("--seconds", type=float, default=None, help="seconds per client count (default 20; quick 3)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    p.add_argument("--chat", type=float, default=0.4, help="share of chat requests (default 0.4)")
    p.add_argument("--adds", type=float, default=0.2, help="share of document adds (default 0.2); the rest: completions")
    p.add_argument("--slots", type=int, default=2, help="the server's --slots (default 2)")
    p.add_argument("--queue", type=int, default=16, help="the server's --queue (default 16)")
    return p


def start_server(args, store: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads or os.cpu_count()),
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(common.ROOT)}
    cmd = [sys.executable, "-m", "longmem.cli", "serve", "--port", "0", "--store", str(store), "--quiet",
           "--slots", str(args.slots), "--queue", str(args.queue), "--model", args.model or TINY_MODEL.name]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if "http://" not in line:
        proc.kill()
        sys.exit(f"the server did not start: {line}{proc.stderr.read()[-2000:]}")
    return proc, "http://" + line.split("http://")[1].split("/")[0]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def run_clients(base: str, n: int, seconds: float, args, acked: list, seed: int) -> dict:
    import httpx

    records = []  # (kind, latency s, status, new tokens)
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(base_url=base, timeout=300) as http:
            while time.perf_counter() < deadline:
                memory = rng.choice(MEMORIES)
                r = rng.random()
                t0 = time.perf_counter()
                try:
                    if r < args.adds:
                        kind, source = "add", f"load-{n}-{i}-{len(records)}-{rng.random():.9f}"
                        resp = http.post(f"/v1/memories/{memory}/documents", json={"text": DOC[: rng.randint(200, 900)],
                                                                                     "source": source})
                    elif r < args.adds + args.chat:
                        kind = "chat"
                        resp = http.post("/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": "Where does Mr Darcy live?"}], "memory": memory,
                            "max_tokens": args.new_tokens, "temperature": 0})
                    else:
                        kind = "completion"
                        resp = http.post("/v1/completions", json={"prompt": PROMPT, "memory": memory, "temperature": 0,
                                                                   "max_tokens": args.new_tokens})
                    status = resp.status_code
                except httpx.HTTPError:
                    status, resp = 0, None
                dt = time.perf_counter() - t0
                tokens = 0
                if status == 200 and kind != "add":
                    tokens = resp.json()["usage"]["completion_tokens"]
                with lock:
                    records.append((kind, dt, status, tokens))
                    if status == 200 and kind == "add":
                        acked.append((memory, source))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in records if r[2] == 200]
    lat = [r[1] * 1000 for r in ok]
    return {"clients": n, "seconds": round(wall, 2), "requests": len(records), "req_per_s": len(ok) / wall,
            "p50_ms": percentile(lat, 0.5), "p99_ms": percentile(lat, 0.99), "tok_per_s": sum(r[3] for r in ok) / wall,
            "errors": sum(r[2] != 200 for r in records), "status_5xx": sum(r[2] >= 500 for r in records),
            "status_429": sum(r[2] == 429 for r in records),
            "mix": {k: sum(r[0] == k for r in records) for k in ("chat", "completion", "add")}}


def main(argv=None) -> dict:
    args = common.parse(build_parser(), argv)
    common.setup(args)
    started = time.perf_counter()
    seconds = args.seconds or (3.0 if args.quick else 20.0)
    import httpx
    import torch

    from longmem.serve import Engine
    from longmem.serve.engine import Params

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        proc, base = start_server(args, store)
        try:
            with httpx.Client(base_url=base, timeout=300) as http:
                for name in MEMORIES:
                    http.post(f"/v1/memories/{name}/documents", json={"text": DOC * 4, "source": "setup"}).raise_for_status()
            acked: list = []
            rows = [run_clients(base, n, seconds, args, acked, args.seed) for n in args.clients]

            # overhead at one client: the same completion over HTTP and in-process, interleaved
            model, tok = load_model_and_tokenizer(args.model or TINY_MODEL, "cpu")
            engine = Engine(model, tok, store, "local")
            params = Params(max_tokens=args.new_tokens, temperature=0.0, top_p=1.0, stops=(), seed=0)
            ids = engine.encode(PROMPT)
            never = threading.Event()
            http_s, local_s = [], []
            with httpx.Client(base_url=base, timeout=300) as http:
                body = {"prompt": PROMPT, "memory": "austen", "temperature": 0, "max_tokens": args.new_tokens}
                for i in range(args.warmup + args.repeats):
                    t0 = time.perf_counter()
                    served = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
                    t1 = time.perf_counter()
                    local = engine.generate(ids, engine.open_memory(None, "austen"), params, never).text
                    t2 = time.perf_counter()
                    assert served == local, (served, local)
                    if i >= args.warmup:
                        http_s.append(t1 - t0)
                        local_s.append(t2 - t1)
            overhead = statistics.median(http_s) / statistics.median(local_s) - 1

            # every acknowledged add is in its memory
            found = {(name, s["file"]) for name in MEMORIES for s in engine.store(None).load(name, model).rows[0].sources}
            lost = [a for a in acked if a not in found]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    total_errors = sum(r["errors"] for r in rows)
    targets = [common.target("errors (all client counts)", total_errors, "<=", 0),
               common.target("5xx answers", sum(r["status_5xx"] for r in rows), "<=", 0),
               common.target("acknowledged adds lost", len(lost), "<=", 0, f"{len(acked)} adds acknowledged"),
               common.target("overhead vs in-process, 1 client", overhead, "<=", 0.10,
                             f"HTTP {statistics.median(http_s) * 1000:.1f} ms, in-process "
                             f"{statistics.median(local_s) * 1000:.1f} ms per {args.new_tokens}-token completion")]
    config = {"model": args.model or TINY_MODEL.name, "seconds": seconds, "new_tokens": args.new_tokens,
              "mix": {"chat": args.chat, "add": args.adds, "completion": round(1 - args.chat - args.adds, 3)},
              "slots": args.slots, "queue": args.queue, "memories": len(MEMORIES), "torch_threads": torch.get_num_threads()}
    return common.finish(args, "serve_load", config, rows, targets,
                         ["clients", "requests", "req_per_s", "p50_ms", "p99_ms", "tok_per_s", "errors", "status_5xx",
                          "status_429"], started,
                         extra={"overhead": {"http_ms": [t * 1000 for t in http_s], "in_process_ms": [t * 1000 for t in local_s],
                                             "ratio_minus_1": overhead},
                                "acknowledged_adds": len(acked), "lost_adds": lost})


if __name__ == "__main__":
    main()
