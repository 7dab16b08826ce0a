"""Retrieval: MemoryBank.search (faiss and torch backends) against bare faiss, bare torch and the FLOP bound.

For each memory size (tokens in one row; chunk 4, so tokens / 4 chunks per head) the same chunk keys
and the same queries (``--queries`` per key/value head) are searched by:

    bank.search [faiss|torch]         the library's whole read: chunk search + gather of K tokens
    bank.search_chunks [faiss|torch]  the chunk search alone; "gather" = search - search_chunks
    faiss IndexFlatIP / faiss.knn     bare exact inner-product search over the bank's chunk keys
    torch matmul+topk                 bare (q @ K^T).topk, the torch backend's reference
    matmul FLOP bound                 2 * heads * queries * chunks * Dh at the dense matmul rate
                                      measured in this run (the floor for an exact search)

and, for the largest sizes, the library's approximate option, ``MemoryBank(index="ivf")`` (faiss IVF-Flat
per row and head, kept in step with FIFO writes), over all heads at several nprobe: build time (the
first search trains it), bank.search time against the exact bank's, and recall@k_c against the exact
top-k_c; plus bare faiss HNSW on one head as a reference (HNSW cannot remove evicted chunks, so it is
not offered by the library). By default keys and queries are i.i.d.
Gaussian: exact search cost does not depend on the data, but IVF/HNSW recall does, and Gaussian data
has no cluster structure, so that recall is a pessimistic bound. ``--real-keys MODEL --text DOCS``
uses a trained model's real memory of real text and its real retrieval queries instead.

    python benchmarks/retrieval.py            # full: 4K .. 1M tokens, 1024 queries per head
    python benchmarks/retrieval.py --quick    # seconds
    python benchmarks/retrieval.py --real-keys models/longmem-tiny --text data/books/train.jsonl data/code/train.jsonl --sizes 65536 262144 1048576
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402

FULL_SIZES = [4096, 16384, 65536, 262144, 1048576]
QUICK_SIZES = [2048, 8192]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser():
    p = common.parser("retrieval", __doc__, full_repeats=3)
    p.add_argument("--sizes", type=int, nargs="+", help=f"memory sizes in tokens (default {FULL_SIZES}; quick {QUICK_SIZES})")
    p.add_argument("--heads", type=int, default=4, help="key/value heads searched (default 4, longmem-tiny's)")
    p.add_argument("--head-dim", type=int, default=64, help="Dh (default 64, the paper's)")
    p.add_argument("--chunk-size", type=int, default=4, help="csz (default 4)")
    p.add_argument("--topk-chunks", type=int, default=16, help="k_c (default 16)")
    p.add_argument("--queries", type=int, default=None, help="queries per head (default 1024; quick 128)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="memory storage dtype (default float32)")
    p.add_argument("--backends", nargs="+", choices=["faiss", "torch"], default=["faiss", "torch"])
    p.add_argument("--torch-max-gib", type=float, default=12.0,
                   help="skip the torch backend where its score matrices (2 x heads x queries x chunks x 4 B) exceed this")
    p.add_argument("--ann-sizes", type=int, nargs="*", default=None,
                   help="sizes that also get approximate indexes (default: the two largest; quick: the largest)")
    p.add_argument("--real-keys", metavar="MODEL_DIR",
                   help="use real memories instead of Gaussian ones: the block-m keys/values of --text written by this "
                        "LongMem checkpoint, and its memory layer's retrieval queries for the segment that follows "
                        "(heads and Dh then come from the model)")
    p.add_argument("--text", nargs="+", help="with --real-keys: documents to write, in order (text files, folders, "
                                             ".jsonl), at least the largest size + one segment of tokens")
    return p


def main(argv=None) -> dict:
    p = build_parser()
    args = common.parse(p, argv)
    device = common.setup(args)
    started = time.perf_counter()
    import faiss

    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    Q = args.queries or (128 if args.quick else 1024)
    H, Dh, csz, kc = args.heads, args.head_dim, args.chunk_size, args.topk_chunks
    rate = common.matmul_rate(device, 512 if args.quick else 2048)
    print(f"dense fp32 matmul rate on {device}: {rate / 1e9:.1f} GFLOP/s")

    from longmem.memory import MemoryBank

    real = None
    if args.real_keys:
        real = RealMemory(args, device, max(sizes))
        sizes = [M for M in sizes if M <= real.tokens]
        H, Dh, Q = real.keys.shape[1], real.keys.shape[-1], min(Q, real.queries.shape[2])
    ann_sizes = args.ann_sizes if args.ann_sizes is not None else sorted(sizes)[-(1 if args.quick else 2):]
    rows, ann_rows, targets = [], [], []
    for M in sizes:
        bank = MemoryBank(1, H, Dh, chunk_size=csz, memory_size=M, topk_chunks=kc, dtype=DTYPES[args.dtype],
                          device=device, backend="faiss")
        if real is None:
            common.fill_memory(bank, M, seed=args.seed)
            g = torch.Generator().manual_seed(args.seed + 1)
            q = torch.randn(1, H, Q, Dh, generator=g)  # (B=1, H, Q, Dh): Q queries per key/value head
        else:  # the newest M tokens before the query segment, as a FIFO memory of size M would hold them
            bank.add(real.keys[:, :, -M:], real.values[:, :, -M:])
            q = real.queries[:, :, :Q]
        q = q.to(device, DTYPES[args.dtype])
        N = bank.rows[0].count
        # the bare references see exactly the bank's chunk keys, as contiguous fp32 arrays per head
        ck = [bank.chunk_keys[0, h, :N].float().cpu().contiguous().numpy() for h in range(H)]
        qn = [q[0, h].float().cpu().contiguous().numpy() for h in range(H)]
        indexes = []
        for h in range(H):
            index = faiss.IndexFlatIP(Dh)
            index.add(ck[h])
            indexes.append(index)

        def bare_index():
            return [indexes[h].search(qn[h], kc)[1] for h in range(H)]

        def bare_knn():
            return [faiss.knn(qn[h], ck[h], kc, metric=faiss.METRIC_INNER_PRODUCT)[1] for h in range(H)]

        exact = np.stack(bare_index())  # (H, Q, kc)
        flops = 2 * H * Q * N * Dh
        size_rows = []

        def row(method, stats, **kw):
            r = {"tokens": M, "chunks": N, "method": method, "median_ms": stats["median_s"] * 1e3,
                 "min_ms": stats["min_s"] * 1e3, "max_ms": stats["max_s"] * 1e3, **kw}
            size_rows.append(r)
            return r

        t_index = common.bench(bare_index, args)
        t_knn = common.bench(bare_knn, args)
        row("faiss IndexFlatIP (bare)", t_index)
        row("faiss.knn (bare)", t_knn)
        bare_faiss_s = min(t_index["median_s"], t_knn["median_s"])
        refs = {"faiss": bare_faiss_s}

        score_gib = 2 * H * Q * bank.capacity * 4 / 2**30
        if "torch" in args.backends and score_gib <= args.torch_max_gib:
            ckt = bank.chunk_keys[:, :, :N].float()  # (1, H, N, Dh)

            def bare_torch():
                return torch.matmul(q.float(), ckt.transpose(-1, -2)).topk(kc, dim=-1).indices  # (1, H, Q, kc)

            t_torch = common.bench(bare_torch, args)
            row("torch matmul+topk (bare)", t_torch)
            refs["torch"] = t_torch["median_s"]

        for backend in args.backends:
            if backend not in refs:
                print(f"skipping the torch backend at {M:,} tokens: its score matrices need ~{score_gib:.1f} GiB "
                      f"(> --torch-max-gib {args.torch_max_gib})")
                continue
            bank.backend = backend  # same stored memory, other search path
            slots, _ = bank.search_chunks(q)
            agree = float((np.sort(slots[0].cpu().numpy(), -1) == np.sort(exact, -1)).all(-1).mean())
            t_chunks = common.bench(lambda: bank.search_chunks(q), args)
            t_search = common.bench(lambda: bank.search(q), args)
            ref = refs[backend]
            row(f"bank.search [{backend}]", t_search, vs_bare=t_search["median_s"] / ref,
                vs_flop_bound=t_search["median_s"] * rate / flops, agree_exact=agree)
            row(f"bank.search_chunks [{backend}]", t_chunks, vs_bare=t_chunks["median_s"] / ref,
                vs_flop_bound=t_chunks["median_s"] * rate / flops)
            gather = max(t_search["median_s"] - t_chunks["median_s"], 1e-9)
            size_rows.append({"tokens": M, "chunks": N, "method": f"  gather (search - chunks) [{backend}]",
                              "median_ms": gather * 1e3, "share": gather / t_search["median_s"]})
            targets.append(common.target(
                f"bank.search[{backend}] / bare {'faiss' if backend == 'faiss' else 'torch'} @ {M:,} tok",
                t_search["median_s"] / ref, "<=", 1.3,
                f"chunk search alone {t_chunks['median_s'] / ref:.2f}x; gather {gather / t_search['median_s']:.0%} of search"))
        row("matmul FLOP bound", {"median_s": flops / rate, "min_s": flops / rate, "max_s": flops / rate},
            gflop=flops / 1e9)
        rows += size_rows

        if M in ann_sizes:
            bank.backend = "faiss"
            ann_rows += library_ivf(args, bank, q, exact, M, real)
            ann_rows += approximate(args, faiss, ck[0], qn[0], exact[0], kc, M)
        bank = indexes = ck = None  # free this size's memory before the next

    print(common.table(ann_rows, ["tokens", "chunks", "index", "params", "build_s", "search_ms", "exact_ms",
                                  "speedup", "recall"],
                       title="\napproximate search (recall@k_c against exact" + ("; Gaussian keys: pessimistic)" if real is None else "; real keys and queries)")))
    config = {"sizes": sizes, "heads": H, "head_dim": Dh, "chunk_size": csz, "topk_chunks": kc, "queries_per_head": Q,
              "dtype": args.dtype, "backends": args.backends, "matmul_gflops": rate / 1e9, "ann_sizes": ann_sizes,
              "data": "i.i.d. Gaussian keys and queries" if real is None else real.describe}
    return common.finish(args, "retrieval", config, rows, targets,
                         ["tokens", "chunks", "method", "median_ms", "min_ms", "vs_bare", "vs_flop_bound", "agree_exact", "share"],
                         started, extra={"approximate": ann_rows})


class RealMemory:
    """Block-m keys/values of real text written by a trained model, and the retrieval queries of the next segment.

    The text is written segment by segment through the backbone up to block m (what ``ingest_file``
    does); then one forward of the following segment with the memory records the queries the memory
    layer sends to ``MemoryBank.search`` (B=1, H query heads, T, Dh), regrouped per key/value head as
    the bank searches them: (1, Hkv, G*T, Dh).
    """

    def __init__(self, args, device, tokens: int):
        from longmem import LongMem
        from longmem.data.streams import encode_documents

        if not args.text:
            sys.exit("--real-keys needs --text (the documents to write into memory)")
        model = LongMem.from_pretrained(args.real_keys).to(device).eval()
        ids = np.concatenate(encode_documents(args.text, _tokenizer(args.real_keys)))
        T, m = model.segment_length, model.memory_layer
        if len(ids) < tokens + T:
            print(f"--text has {len(ids):,} tokens: real memories up to {max(0, len(ids) - T):,} tokens only")
        tokens = min(tokens, max(0, len(ids) - T)) // args.chunk_size * args.chunk_size
        if tokens < args.chunk_size:
            sys.exit(f"--text has {len(ids):,} tokens, too few for one segment of {T} and a memory")
        bank = model.new_memory(1, memory_size=tokens, chunk_size=args.chunk_size, topk_chunks=args.topk_chunks)
        with torch.no_grad():
            for i in range(0, tokens, T):
                x = torch.from_numpy(ids[i:min(i + T, tokens)]).long().view(1, -1).to(device)
                kv = model.backbone(x, m, upto=m)
                bank.add(kv.keys, kv.values)
            k, v = bank.chronological(0)  # (Hkv, N, csz, Dh), oldest first
            flat = lambda t: t.reshape(t.shape[0], -1, t.shape[-1]).unsqueeze(0).float().cpu()  # noqa: E731  (1, Hkv, N*csz, Dh)
            self.keys, self.values = flat(k), flat(v)
            captured = []
            search = bank.search
            bank.search = lambda q, **kw: captured.append(q.detach().float().cpu()) or search(q, **kw)
            model(torch.from_numpy(ids[tokens:tokens + T]).long().view(1, -1).to(device), memory=bank, update_memory=False)
        q = captured[0]  # (1, H, T, Dh)
        Hkv = self.keys.shape[1]
        self.queries = q.reshape(1, Hkv, -1, q.shape[-1])  # query head h -> kv head h // G, as MemoryBank.search
        self.tokens = self.keys.shape[2]
        self.describe = (f"real: {' '.join(args.text)} written by {args.real_keys} (block {m}), queries of the following "
                         f"{T}-token segment from its memory layer")


def _tokenizer(model_dir):
    from longmem.io import read_checkpoint_meta
    from longmem.loading import load_tokenizer

    ref = read_checkpoint_meta(Path(model_dir))["backbone"]["path"]
    return load_tokenizer(str(Path(model_dir) / ref if (Path(model_dir) / ref).is_dir() else ref))


def library_ivf(args, exact_bank, q, exact: np.ndarray, tokens: int, real) -> list[dict]:
    """MemoryBank(index="ivf") holding the same memory as ``exact_bank``: build, bank.search time, recall@k_c."""
    from longmem.memory import MemoryBank

    H, kc, csz = exact_bank.num_heads, exact_bank.topk_chunks, exact_bank.chunk_size
    bank = MemoryBank(1, H, exact_bank.head_dim, chunk_size=csz, memory_size=exact_bank.memory_size, topk_chunks=kc,
                      dtype=exact_bank.dtype, device=exact_bank.device, backend="faiss", index="ivf")
    if real is None:
        common.fill_memory(bank, tokens, seed=args.seed)
    else:
        bank.add(real.keys[:, :, -tokens:], real.values[:, :, -tokens:])
    assert torch.equal(bank.chunk_keys[0, :, :bank.rows[0].count], exact_bank.chunk_keys[0, :, :bank.rows[0].count])
    t0 = time.perf_counter()
    bank.search_chunks(q[:, :, :1])  # trains the per-head indexes and fills them
    build = time.perf_counter() - t0
    exact_s = common.bench(lambda: exact_bank.search(q), args)["median_s"]
    out = []
    for nprobe in (4, 16, 64):
        if nprobe >= bank.nlist:
            continue
        bank.nprobe = nprobe
        slots = bank.search_chunks(q)[0][0].cpu().numpy()  # (H, Q, kc)
        recall = float(np.mean([len(set(a) & set(b)) / kc for a, b in zip(slots.reshape(-1, kc), exact.reshape(-1, kc))]))
        s = common.bench(lambda: bank.search(q), args)["median_s"]
        out.append({"tokens": tokens, "chunks": bank.rows[0].count, "index": "bank.search [ivf]", "trained": bool(bank._ivf),
                    "params": f"nlist={bank.nlist} nprobe={nprobe}", "build_s": build, "search_ms": s * 1e3,
                    "exact_ms": exact_s * 1e3, "speedup": exact_s / s, "recall": recall})
    return out


def approximate(args, faiss, xb: np.ndarray, xq: np.ndarray, exact: np.ndarray, kc: int, tokens: int) -> list[dict]:
    """Bare faiss HNSW (inner product) on one head: build, search, recall@kc against ``exact`` (Q, kc)."""
    N, Dh = xb.shape
    flat = faiss.IndexFlatIP(Dh)
    flat.add(xb)
    exact_s = common.bench(lambda: flat.search(xq, kc), args)["median_s"]
    out = []

    def recall(I):
        return float(np.mean([len(set(a) & set(b)) / kc for a, b in zip(I, exact)]))

    def add_row(name, params, build_s, index):
        D, I = index.search(xq, kc)
        s = common.bench(lambda: index.search(xq, kc), args)["median_s"]
        out.append({"tokens": tokens, "chunks": N, "index": name, "params": params, "build_s": build_s,
                    "search_ms": s * 1e3, "exact_ms": exact_s * 1e3, "speedup": exact_s / s, "recall": recall(I)})

    hnsw = faiss.IndexHNSWFlat(Dh, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    t0 = time.perf_counter()
    hnsw.add(xb)
    build = time.perf_counter() - t0
    for ef in (32, 128):
        hnsw.hnsw.efSearch = ef
        add_row("HNSW", f"M=32 efC=80 efSearch={ef}", build, hnsw)
    return out


if __name__ == "__main__":
    main()
