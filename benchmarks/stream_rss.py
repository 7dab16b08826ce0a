"""Stream RSS: `longmem memory add` reads a file of any size in bounded memory.

A text file of the requested size is generated on disk (written block by block, never held in RAM),
and the real command, ``python -m longmem.cli memory add NAME FILE --memory-size M``, reads it in a
subprocess. While it runs, this script samples the child's /proc/PID/status (VmRSS, and VmHWM, the
kernel's high-water mark of its resident memory) and /proc/PID/fdinfo (how far into the file it has
read) every 20 ms; a complete run also reports its exact VmHWM at exit. Three kinds of run:

    complete, 1x and 2x     the same memory size, files of S and 2S bytes, read to the end and saved:
                            the peak must not grow with the file (target: peak(2S) / peak(S) <= 1.2)
    complete, large memory  the S-byte file into a memory 16x larger: the peak grows with the memory
                            (the FIFO bank), which is what bounds it
    stream (full mode)      a --size file (default 3 GiB) read for at most --max-seconds, then killed
                            (SIGKILL, the child only): resident memory against bytes read. `memory add`
                            reads ~0.3 MB/s here (one thread; tokenizer and backbone), so a 3 GiB file
                            would take about 3 hours: the run covers the first ~100 MB of it, and the
                            JSON says exactly how much was read. It shows the file is streamed (the
                            peak stops rising once reading is under way), not how a 3 GiB read ends.

The model is a random-weight 2-layer Llama (memory layer 1, T 256; speed, not quality, is what this
needs) saved as a checkpoint folder with a byte-level BPE tokenizer (4,096 tokens) trained on the
generated text, unless --model is given. The text is English-like words from a fixed vocabulary,
about 4.6 bytes per token.

    python benchmarks/stream_rss.py            # full: complete runs at 16 and 32 MiB, then a 3 GiB stream for <= 6 min
    python benchmarks/stream_rss.py --quick    # complete runs at 0.5 and 1 MiB, no stream (the smoke test runs this)
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MIB = 1 << 20
BLOCK = 1 << 20  # the generator writes the file in blocks of this size
WORDS = ("the of and to in a is that for it as was with be by on not he i this are or his from at which but have an "
         "they you were her she there one all we their him been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way well "
         "down should because each just those people how too little state good very make world still own see men work "
         "long get here between both life being under never day same another know while last might us great old year "
         "off come since against go came right used take three river castle garden letter morning evening sister "
         "brother carriage window memory chapter house door light night water hand").split()
# The generated model: small and shallow, so that reading is fast (ingest runs blocks 0..m = 0..1); a
# vocabulary large enough for whole words, so a token is ~6 bytes of text.
SHAPE = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
# what the child runs: the real CLI entry point, plus one line at exit with its own VmHWM (exact peak)
CHILD = ("import atexit, os, sys\n"
         "def peak():\n"
         "    with open('/proc/self/status') as f:\n"
         "        hwm = [l for l in f if l.startswith('VmHWM')][0].split()[1]\n"
         "    with open(os.environ['STREAM_RSS_PEAK'], 'w') as f:\n"
         "        f.write(hwm)\n"
         "atexit.register(peak)\n"
         "from longmem.cli import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


def size_arg(text: str) -> int:
    """'3G', '64M', '500k' or a number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)[bB]?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 3G, 64M, 500k)")
    return int(float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()])


def build_parser():
    p = common.parser("stream_rss", __doc__, full_repeats=1)
    p.add_argument("--size", type=size_arg, default=None, help="the streamed file's size (full default 3G; quick: no stream run)")
    p.add_argument("--max-seconds", type=float, default=360.0, help="the stream run is stopped after this long (default 360)")
    p.add_argument("--complete-size", type=size_arg, default=None,
                   help="S: complete runs read files of S and 2S bytes (default 16M, with --model 4M; quick 512k)")
    p.add_argument("--memory-size", type=int, default=None, help="memory tokens, FIFO (default 4096; the third run uses 16x)")
    p.add_argument("--segment-length", type=int, default=256, help="T of the generated model (default 256)")
    return p


def text_block(rng: random.Random, size: int) -> bytes:
    """About ``size`` bytes of words, 8-20 per line, a blank line now and then."""
    out, n = [], 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + ("\n\n" if rng.random() < 0.1 else "\n")
        out.append(line)
        n += len(line)
    return "".join(out).encode()[:size]


def write_text_file(path: Path, size: int, seed: int = 0, pool: int = 32) -> Path:
    """A ``size``-byte text file: blocks drawn from a pool of random 1 MiB blocks, written one at a time."""
    rng = random.Random(seed)
    blocks = [text_block(rng, BLOCK) for _ in range(min(pool, max(1, size // BLOCK)))]
    with open(path, "wb") as f:
        left = size
        while left > 0:
            block = blocks[rng.randrange(len(blocks))]
            cut = block[:left] if left < len(block) else block
            if left <= len(block):  # end on a whole line
                cut = cut[: cut.rfind(b"\n") + 1] or cut
                cut += b"\n" * (left - len(cut))
            f.write(cut)
            left -= len(cut)
    return path


def make_checkpoint(args, folder: Path) -> tuple[Path, dict]:
    """--model, or a random-weight model of the quick shape with a tokenizer trained on the generated text."""
    import torch
    import transformers

    from longmem import LongMem, LongMemConfig
    from longmem.data.corpora import train_tokenizer

    if args.model:
        model = LongMem.from_pretrained(args.model)
        return Path(args.model), {"source": str(args.model), "segment_length": model.segment_length,
                                  "kv_heads": model.backbone.num_kv_heads, "head_dim": model.backbone.head_dim,
                                  "chunk_size": model.config.chunk_size, "memory_size": model.config.memory_size,
                                  "dtype": str(model.dtype).removeprefix("torch.")}
    shape = SHAPE
    corpus = folder / "corpus"
    corpus.mkdir()
    (corpus / "sample.txt").write_bytes(text_block(random.Random(args.seed), 1 << 20))
    tok = train_tokenizer([corpus], vocab_size=shape["vocab_size"], out=folder / "tok")
    torch.manual_seed(args.seed)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    cfg = LongMemConfig(memory_layer=1, segment_length=args.segment_length, memory_size=4096, chunk_size=4)
    model = LongMem.from_backbone(hf.eval(), cfg)
    path = folder / "model"
    model.save_pretrained(path, save_backbone=True, tokenizer=tok)
    return path, {"source": "random weights, 2 layers (memory layer 1)", **shape, "segment_length": args.segment_length,
                  "kv_heads": model.backbone.num_kv_heads, "head_dim": model.backbone.head_dim, "chunk_size": 4,
                  "memory_size": 4096, "dtype": "float32"}


def bank_bytes(desc: dict, memory_size: int) -> int:
    """A full one-row bank in RAM: keys + values, and one fp32 mean key per chunk (MemoryBank.nbytes)."""
    item = {"float32": 4, "bfloat16": 2, "float16": 2}[desc["dtype"]]
    per_token = 2 * desc["kv_heads"] * desc["head_dim"] * item + desc["kv_heads"] * desc["head_dim"] * 4 / desc["chunk_size"]
    return int(memory_size * per_token)


def status_kib(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def position(pid: int, target: str) -> int | None:
    """How far the process has read into ``target`` (None: the file is not open now)."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    return int(f.readline().split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return None


def run_add(ckpt: Path, file: Path, name: str, memory_size: int, home: Path, threads: int, max_seconds: float | None) -> dict:
    """Run `longmem memory add NAME FILE`; sample its memory and read position until it ends (or is stopped)."""
    peak_file = home / f"{name}.peak"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "STREAM_RSS_PEAK": str(peak_file)}
    cmd = [sys.executable, "-c", CHILD, "memory", "add", name, str(file), "--model", str(ckpt), "--memory-size",
           str(memory_size), "--no-progress", "--home", str(home)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target, size = str(file.resolve()), file.stat().st_size
    samples, last_pos, started_reading, stopped, before_reading = [], 0, None, False, None
    while proc.poll() is None:
        try:
            st = status_kib(proc.pid)
            pos = position(proc.pid, target)
        except OSError:  # it just exited
            break
        now = time.perf_counter() - t0
        if pos is not None and pos > 8192 and started_reading is None:  # past the up-front check of the first 8 KiB
            started_reading = now
        last_pos = max(last_pos, pos or 0) if started_reading is not None else 0
        if "VmRSS" in st and started_reading is None:
            before_reading = st["VmRSS"] / 1024  # imports and the model loaded, the file not read yet
        if "VmRSS" in st:
            samples.append({"t_s": round(now, 3), "read_mb": last_pos / 1e6, "rss_mib": st["VmRSS"] / 1024,
                            "hwm_mib": st["VmHWM"] / 1024})
        if max_seconds is not None and started_reading is not None and now - started_reading > max_seconds:
            proc.kill()  # our own child
            stopped = True
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if not stopped and proc.returncode != 0:
        raise SystemExit(f"memory add failed (exit {proc.returncode}): {err.strip()[-2000:]}")
    m = re.search(r"(\d+) tokens stored \(\+(\d+) pending\)", out)
    tokens = None
    if not stopped:
        from longmem.store import MemoryStore

        tokens = sum(s["tokens"] for s in MemoryStore(home).header(name)["rows"][0]["sources"])
    read = size if not stopped else last_pos
    reading_s = wall - (started_reading or 0.0)
    peak_kib = int(peak_file.read_text()) if peak_file.is_file() else None
    return {"complete": not stopped, "file_mb": size / 1e6, "read_mb": read / 1e6, "read_fraction": read / size,
            "tokens": tokens, "stored": int(m.group(1)) if m else None, "memory_size": memory_size,
            "seconds": wall, "reading_s": reading_s, "mb_per_s": read / 1e6 / max(reading_s, 1e-9),
            "tok_per_s": tokens / reading_s if tokens else None,
            "rss_before_reading_mib": before_reading,
            "peak_rss_mib": peak_kib / 1024 if peak_kib else max(s["hwm_mib"] for s in samples),
            "peak_from": "VmHWM at exit" if peak_kib else "VmHWM, last 20 ms sample",
            "samples": samples}


def reading_profile(run: dict) -> dict:
    """Resident memory and its high-water mark once 10% of what was read is read, and at the end."""
    pts = [s for s in run["samples"] if s["read_mb"] > 0]
    if not pts:
        return {}
    first = next(s for s in pts if s["read_mb"] >= 0.1 * pts[-1]["read_mb"])
    return {"read_mb_at_10pct": first["read_mb"], "rss_at_10pct_mib": first["rss_mib"], "hwm_at_10pct_mib": first["hwm_mib"],
            "rss_at_end_mib": pts[-1]["rss_mib"], "hwm_at_end_mib": pts[-1]["hwm_mib"]}


def thin(samples: list[dict], keep: int = 60) -> list[dict]:
    step = max(1, len(samples) // keep)
    return samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else [])  # always the last


def main(argv=None) -> dict:
    args = common.parse(build_parser(), argv)
    common.setup(args)
    started = time.perf_counter()
    threads = args.threads or 1  # `memory add` as a user runs it on one thread here; the figures are about memory
    S = args.complete_size or (MIB // 2 if args.quick else 4 * MIB if args.model else 16 * MIB)
    stream_size = args.size if args.size is not None else (None if args.quick else 3 * (1 << 30))
    tmp = Path(tempfile.mkdtemp(prefix="longmem-stream-rss-"))
    try:
        ckpt, desc = make_checkpoint(args, tmp)
        M = args.memory_size or 4096
        home = tmp / "home"
        home.mkdir()
        runs = []
        for label, size, mem in (("complete, 1x", S, M), ("complete, 2x", 2 * S, M), ("complete, 16x memory", S, 16 * M)):
            f = write_text_file(tmp / f"text-{size}.txt", size, seed=args.seed)
            run = run_add(ckpt, f, f"run{len(runs)}", mem, home, threads, None)
            runs.append({"run": label, **run})
            print(f"{label}: {size / 1e6:.0f} MB, memory {mem} tokens: peak RSS {run['peak_rss_mib']:.0f} MiB, "
                  f"{run['mb_per_s']:.2f} MB/s", flush=True)
            if label != "complete, 2x":
                f.unlink()
        for f in tmp.glob("text-*.txt"):
            f.unlink()
        if stream_size:
            f = write_text_file(tmp / "stream.txt", stream_size, seed=args.seed)
            print(f"streaming {stream_size / 1e9:.2f} GB for at most {args.max_seconds:.0f} s ...", flush=True)
            run = run_add(ckpt, f, "stream", M, home, threads, args.max_seconds)
            runs.append({"run": "stream" + ("" if run["complete"] else " (stopped at the time limit)"), **run,
                         **reading_profile(run)})
            f.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    for r in runs:
        r["memory_bank_mib"] = bank_bytes(desc, r["memory_size"]) / MIB
        r["growth_mib"] = r["peak_rss_mib"] - (r["rss_before_reading_mib"] or r["peak_rss_mib"])  # what reading and saving added
        r["peak_over_file"] = r["peak_rss_mib"] * MIB / (r["file_mb"] * 1e6)
    one, two, big = runs[0], runs[1], runs[2]
    targets = [common.target("peak RSS, 2x file / 1x file (complete runs)", two["peak_rss_mib"] / one["peak_rss_mib"], "<=", 1.2,
                             f"{one['file_mb']:.0f} MB: {one['peak_rss_mib']:.0f} MiB, {two['file_mb']:.0f} MB: "
                             f"{two['peak_rss_mib']:.0f} MiB; a 16x larger memory ({big['memory_bank_mib']:.1f} MiB bank) "
                             f"peaks at {big['peak_rss_mib']:.0f} MiB")]
    stream = runs[3] if len(runs) > 3 else None
    if stream and stream.get("hwm_at_10pct_mib"):
        targets.append(common.target("streaming: peak RSS at the end / peak RSS at 10% read",
                                     stream["hwm_at_end_mib"] / stream["hwm_at_10pct_mib"], "<=", 1.1,
                                     f"{stream['read_mb']:.0f} of {stream['file_mb']:.0f} MB read in {stream['reading_s']:.0f} s "
                                     f"({'complete' if stream['complete'] else 'stopped at --max-seconds'}); peak "
                                     f"{stream['hwm_at_10pct_mib']:.0f} MiB at {stream['read_mb_at_10pct']:.0f} MB, "
                                     f"{stream['hwm_at_end_mib']:.0f} MiB at {stream['read_mb']:.0f} MB"))
    samples = [{"run": r["run"], **s} for r in runs for s in thin(r.pop("samples"))]
    config = {"complete_size_bytes": S, "stream_size_bytes": stream_size, "max_seconds": args.max_seconds if stream_size else None,
              "memory_size": M, "threads": threads, "model": desc,
              "measured": "child VmHWM (/proc) at exit for complete runs; sampled every 20 ms for the stopped stream"}
    return common.finish(args, "stream_rss", config, runs, targets,
                         ["run", "file_mb", "read_mb", "memory_size", "memory_bank_mib", "seconds", "mb_per_s",
                          "rss_before_reading_mib", "peak_rss_mib", "growth_mib"], started, extra={"samples": samples})


if __name__ == "__main__":
    main()
