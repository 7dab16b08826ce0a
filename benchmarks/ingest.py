"""Ingest: writing a long document into memory against reading it with the backbone alone.

    ingest_file                 ``longmem.store.ingest_file``, what ``longmem memory add`` runs: read the
                                file in pieces, tokenize, run the backbone up to block m per segment of
                                T tokens, write each segment's keys/values to the memory
    backbone forward (HF)       the HF model's own forward over the same token ids, all L layers, no
                                LM head, no KV cache, segment by segment: the cost of merely reading
                                the document with the backbone (the reference of the target)
    backbone forward (longmem)  ``model.backbone`` over the same segments, all L blocks, no write

and the parts of ingest: tokenize (the same pieces through the same tokenizer), backbone up to block
m, write (``MemoryBank.add`` of the precomputed keys/values). Throughput is document tokens per
second; the target compares ingest_file (tokenization included) with the HF forward (tokenization
excluded), so it is conservative.

The document is ``--text FILE`` (any UTF-8 file), else this Python's standard library sources
concatenated (real text, on every machine). The tokenizer is the checkpoint's with ``--model``,
else a byte-level BPE trained here on the document (vocabulary = the model's).

    python benchmarks/ingest.py            # full: default-model shape, 32,768-token document, T = 1024
    python benchmarks/ingest.py --quick    # seconds
"""

from __future__ import annotations

import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402


def build_parser():
    p = common.parser("ingest", __doc__, full_repeats=3)
    p.add_argument("--tokens", type=int, default=None, help="document length in tokens (default 32768; quick 2048)")
    p.add_argument("--segment-length", type=int, default=None, help="T (default: the model's segment length, 1024 for the default shape; quick without --model 256)")
    p.add_argument("--text", default=None, help="a UTF-8 text file to ingest (default: stdlib sources)")
    return p


def stdlib_text(chars: int) -> str:
    """About ``chars`` characters of this interpreter's standard library sources (deterministic order)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, n = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out.append(text)
        n += len(text)
        if n >= chars:
            break
    return "".join(out)[:chars]


def main(argv=None) -> dict:
    args = common.parse(build_parser(), argv)
    device = common.setup(args)
    started = time.perf_counter()
    from longmem.store import ingest_file, read_pieces
    from longmem.tokens import encode, token_ids

    want = args.tokens or (2048 if args.quick else 32768)
    T = args.segment_length or (256 if args.quick and not args.model else None)  # None: the model's own
    model, shape = common.make_model(args, device, **({"segment_length": T} if T else {}))
    model.eval()
    T = model.segment_length
    tmp = tempfile.TemporaryDirectory(prefix="longmem-bench-")
    tokenizer = load_or_train_tokenizer(args, model, Path(tmp.name))

    doc, tokens = write_document(tokenizer, want, args.text, Path(tmp.name))
    n = len(tokens)
    segments = [torch.from_numpy(tokens[i:i + T]).view(1, -1).to(device) for i in range(0, n, T)]
    m = model.memory_layer

    def new_bank():
        size = -(-n // model.config.chunk_size) * model.config.chunk_size
        return model.new_memory(1, memory_size=max(size, model.config.chunk_size))

    def ingest():
        bank = new_bank()
        ingest_file(model, tokenizer, bank, doc)
        return bank

    hf_base = model.backbone.model.base_model  # the HF transformer without the LM head

    @torch.no_grad()
    def hf_forward():
        for x in segments:
            hf_base(x, use_cache=False)

    @torch.no_grad()
    def longmem_backbone():
        for x in segments:
            model.backbone(x, m)

    def tokenize():
        for piece in read_pieces(doc):
            token_ids(tokenizer, piece)

    @torch.no_grad()
    def backbone_to_m():
        return [model.backbone(x, m, upto=m) for x in segments]

    kvs = backbone_to_m()

    def write():
        bank = new_bank()
        for kv in kvs:
            bank.add(kv.keys, kv.values, rows=[0])

    bank = ingest()
    assert bank.num_tokens(0) + bank.num_pending(0) == n, "ingest_file should store every token"
    stats = {}
    for name, fn in (("ingest_file (tokenize + backbone to m + write)", ingest),
                     ("backbone forward, HF, all layers", hf_forward),
                     ("backbone forward, longmem, all layers", longmem_backbone),
                     ("  part: tokenize", tokenize), ("  part: backbone to block m", backbone_to_m),
                     ("  part: write (MemoryBank.add)", write)):
        stats[name] = common.bench(fn, args)
    ref = stats["backbone forward, HF, all layers"]["median_s"]
    ingest_s = stats["ingest_file (tokenize + backbone to m + write)"]["median_s"]
    rows = [{"path": name, "median_ms": s["median_s"] * 1e3, "min_ms": s["min_s"] * 1e3, "max_ms": s["max_s"] * 1e3,
             "tok_per_s": n / s["median_s"], "vs_hf_forward": ref / s["median_s"]} for name, s in stats.items()]
    targets = [common.target("ingest throughput / HF backbone forward throughput", ref / ingest_s, ">=", 0.8,
                             f"ingest runs blocks 0..{m} of {model.backbone.num_layers}; tokenize "
                             f"{stats['  part: tokenize']['median_s'] / ingest_s:.0%}, write "
                             f"{stats['  part: write (MemoryBank.add)']['median_s'] / ingest_s:.0%} of ingest")]
    config = {"tokens": n, "segment_length": T, "segments": len(segments), "memory_layer": m,
              "document": args.text or "stdlib sources", "tokenizer": "checkpoint's" if args.model else "BPE trained here",
              "model": shape}
    tmp.cleanup()
    return common.finish(args, "ingest", config, rows, targets,
                         ["path", "median_ms", "min_ms", "tok_per_s", "vs_hf_forward"], started)


def write_document(tokenizer, want: int, text: str | None, folder: Path) -> tuple[Path, np.ndarray]:
    """``folder/document.txt``: ``want`` tokens of ``text`` (a file; default stdlib sources), cut at a token boundary
    and decoded; and its token ids as ``ingest_file`` reads them (re-tokenizing may differ by a few tokens)."""
    from longmem.store import read_pieces
    from longmem.tokens import encode, token_ids

    source = Path(text).read_text(encoding="utf-8", errors="replace") if text else stdlib_text(6 * want)
    ids = token_ids(tokenizer, source)
    if len(ids) < want:
        sys.exit(f"the text has {len(ids)} tokens, fewer than --tokens {want}; give a longer --text or fewer --tokens")
    doc = folder / "document.txt"
    doc.write_text(tokenizer.decode(ids[:want]), encoding="utf-8")
    tokens = np.concatenate([encode(tokenizer, piece) for piece in read_pieces(doc)])
    return doc, tokens


def load_or_train_tokenizer(args, model, tmp: Path):
    if args.model:  # the checkpoint's backbone folder holds its tokenizer (as `longmem memory add` finds it)
        from longmem.gguf import resolve_reference
        from longmem.io import read_checkpoint_meta
        from longmem.loading import load_tokenizer

        ref = read_checkpoint_meta(Path(args.model))["backbone"]["path"]  # a folder, or a package:/.gguf reference
        return load_tokenizer(str(Path(args.model) / ref if (Path(args.model) / ref).is_dir() else resolve_reference(ref)))
    from longmem.data.corpora import train_tokenizer

    corpus = tmp / "corpus.txt"
    corpus.write_text(stdlib_text(200_000 if args.quick else 2_000_000), encoding="utf-8")
    return train_tokenizer([corpus], vocab_size=min(model.backbone.vocab_size, 8192))


if __name__ == "__main__":
    main()
