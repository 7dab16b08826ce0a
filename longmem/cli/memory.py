"""``longmem memory add|list|show|remove``, ``longmem generate`` and ``longmem chat``."""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from longmem.cli.eval import memory_settings
from longmem.data.chat import has_chat_template, user_turn
from longmem.errors import LongMemError
from longmem.generation import Decoder, SamplingConfig, generate_stream
from longmem.loading import load_model_and_tokenizer, resolve_device
from longmem.store import MemoryStore, check_name, check_text_file, ingest_file
from longmem.tokens import token_ids

# a bound against typos, not a limit of the method (memory keeps the context): about an hour of CPU decoding
MAX_NEW_TOKENS = 1_000_000


def _store(args) -> MemoryStore:
    return MemoryStore(args.home)


def _load(args):
    device = resolve_device(args.device) if getattr(args, "device", None) else None  # before the slow part
    model, tok = load_model_and_tokenizer(args.model, dtype=getattr(args, "dtype", None))
    if device is not None:
        model.to(device)
    return model.eval(), tok


# -- memory ----------------------------------------------------------------------------------------


def _memory_add(args) -> int:
    store = _store(args)
    check_name(args.name)
    files = [Path(f) for f in args.files]
    for f in files:
        check_text_file(f)  # every file is checked before anything is written
    model, tok = _load(args)
    sizes = memory_settings(model, args)  # valid before anything is written
    with store.lock(args.name):
        if store.exists(args.name):
            bank = store.load(args.name, model)
        else:
            bank = model.new_memory(1, **sizes, index=args.index, nprobe=args.nprobe)
        for f in files:
            with tqdm(desc=f"reading {f.name}", unit="tok", disable=args.no_progress, file=sys.stderr) as bar:
                n = ingest_file(model, tok, bank, f, progress=bar)
            bank.rows[0].sources.append({"file": str(f.resolve()), "tokens": n,
                                          "added": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
        store.save(args.name, bank)  # atomic: the old memory stays whole until this returns
    print(f"memory {args.name!r}: {bank.num_tokens(0)} tokens stored (+{bank.num_pending(0)} pending) "
          f"from {len(bank.rows[0].sources)} source(s), {store.path(args.name)}")
    return 0


def _memory_list(args) -> int:
    store = _store(args)
    names = store.names()
    if not names:
        print(f"no memories in {store.dir}")
        return 0
    print(f"{'name':<24}{'tokens':>10}{'size':>12}  model")
    for name in names:
        try:
            h = store.header(name)
            print(f"{name:<24}{h['rows'][0]['tokens']:>10}{h['bytes'] / 1e6:>10.1f}MB  {h['info'].get('model', '?')}")
        except LongMemError as e:
            print(f"{name:<24}{'?':>10}{'?':>12}  unreadable: {e}")
    return 0


def _memory_show(args) -> int:
    h = _store(args).header(args.name)
    row = h["rows"][0]
    out = {"name": args.name, "model": h["info"].get("model"), "fingerprint": h["info"].get("fingerprint"),
           "memory_layer": h["info"].get("memory_layer"), "tokens": row["tokens"], "pending": row["pending"],
           "memory_size": h["memory_size"], "chunk_size": h["chunk_size"], "dtype": h["dtype"],
           "index": h.get("index", "flat") + (f" (nlist {h['nlist']}, nprobe {h['nprobe']})" if h.get("index") == "ivf" else ""),
           "bytes": h["bytes"], "modified": h["modified"], "sources": row["sources"]}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for k, v in out.items():
        if k != "sources":
            print(f"{k:<14}{v}")
    print("sources")
    for s in out["sources"]:
        print(f"  {s.get('file')}  {s.get('tokens')} tokens  {s.get('added', '')}" if isinstance(s, dict) else f"  {s}")
    return 0


def _memory_remove(args) -> int:
    _store(args).remove(args.name)
    print(f"removed memory {args.name!r}")
    return 0


# -- generate / chat -------------------------------------------------------------------------------


def _sampling(args) -> dict:
    """The sampling flags as ``generate`` keyword arguments, checked (before any model is loaded)."""
    if not 0 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise LongMemError(f"--max-new-tokens must be between 0 and {MAX_NEW_TOKENS:,}, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise LongMemError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0, temperature=args.temperature or 1.0,
              top_k=args.top_k, top_p=args.top_p, stop_strings=tuple(getattr(args, "stop", None) or ()))
    SamplingConfig(**kw)
    return kw


def _generate(args) -> int:
    sampling = _sampling(args)
    if args.memory and not args.no_memory:
        check_name(args.memory)
    if args.prompt_file is not None:
        args.prompt = _read_prompt(args.prompt_file)
    model, tok = _load(args)
    memory = None
    if args.memory and not args.no_memory:
        memory = _store(args).load(args.memory, model)
    ids = token_ids(tok, args.prompt)
    if not ids:
        raise LongMemError("the prompt is empty; pass --prompt TEXT or --prompt-file FILE")
    prompt = torch.tensor([ids], dtype=torch.long)
    gen = torch.Generator(device=model.device).manual_seed(args.seed)
    new: list[int] = []
    printed = ""
    sys.stdout.write(args.prompt)

    def stream(t):
        nonlocal printed
        new.append(int(t[0]))
        text = tok.decode(new)
        if not text.endswith("\ufffd"):  # wait for a whole UTF-8 character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text

    model.generate(prompt, memory=memory, streamer=stream, generator=gen, tokenizer=tok, **sampling)
    sys.stdout.write(tok.decode(new)[len(printed):] + "\n")
    return 0


def _read_prompt(path: str) -> str:
    """The text of ``--prompt-file`` (``-``: standard input), exactly as written."""
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise LongMemError(f"--prompt-file {path} is not UTF-8 text") from None
    except OSError as e:
        raise LongMemError(f"cannot read --prompt-file {path}: {e.strerror}") from None


def _chat(args) -> int:
    store = _store(args)
    check_name(args.memory)
    model, tok = _load(args)
    templated = has_chat_template(tok) and not args.plain  # an instruct model: its own turns, replies end at its eos
    stop = {"stop_token_ids": (tok.eos_token_id,)} if templated else {"stop_strings": ("\n",)}
    cfg = SamplingConfig(**{**_sampling(args), **stop})
    lock = store.lock(args.memory) if args.remember else None
    if lock is not None:
        lock.__enter__()
    try:
        memory = store.load(args.memory, model) if store.exists(args.memory) else None
        if memory is None:
            if not args.remember:
                raise LongMemError(f"no memory named {args.memory!r}; create it with `longmem memory add` or chat with --remember")
            memory = model.new_memory(1)
        dec = Decoder(model, 1, memory)
        gen = torch.Generator(device=model.device).manual_seed(args.seed)
        interactive = sys.stdin.isatty()
        if interactive:
            print(f"chatting over memory {args.memory!r} ({memory.num_tokens(0)} tokens); an empty line or Ctrl-D ends")
        while True:
            if interactive:
                sys.stdout.write("you> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            if not line or not line.strip():
                break
            if templated:
                said = torch.tensor([user_turn(tok, line.strip(), first=dec.tokens_seen == 0)])
            else:
                text = f"{args.user_prefix}{line.strip()}\n{args.bot_prefix}"
                said = torch.tensor([token_ids(tok, text)])
            seen = dec.tokens_seen + said.shape[1]
            reply = [int(t[0]) for t in generate_stream(model, said, cfg=cfg, generator=gen, tokenizer=tok, decoder=dec)]
            unread = reply[dec.tokens_seen - seen:]  # the token the reply stopped on: the conversation goes on after it
            if unread:
                dec.feed(torch.tensor([unread], device=model.device), check=False)
            print(f"{args.bot_prefix}{tok.decode(reply, skip_special_tokens=templated).strip()}")
            sys.stdout.flush()
        if args.remember:
            dec.flush()  # what is still in the window goes to memory too
            memory.rows[0].sources.append({"file": "chat", "tokens": dec.tokens_seen,
                                           "added": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
            store.save(args.memory, memory)
            print(f"saved the conversation to memory {args.memory!r} ({memory.num_tokens(0)} tokens)")
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)
    return 0


# -- parsers ---------------------------------------------------------------------------------------


def _common(p, model=True):
    p.add_argument("--home", help="memory store folder (default: $LONGMEM_HOME or ~/.local/share/longmem)")
    if model:
        p.add_argument("--model", help="LongMem checkpoint folder (default: the shipped default, longmem-tiny; or a shipped model's name, e.g. smollm2-135m-longmem)")
        p.add_argument("--device", help="cpu or cuda (default: cpu)")
        p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights' type after loading (default: as stored)")


def _sampling_flags(p):
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")


def add_parser(sub) -> None:
    mem = sub.add_parser("memory", help="named, persistent memories (add, list, show, remove)",
                         description="Named memories that outlive the process, each tied to the model that built it.")
    msub = mem.add_subparsers(dest="memory_command", metavar="ACTION")
    msub.required = True
    p = msub.add_parser("add", help="read files into a memory (created if new, appended otherwise)")
    p.add_argument("name", help="memory name: letters, digits, '.', '_', '-'")
    p.add_argument("files", nargs="+", help="UTF-8 text files of any size (streamed, never loaded whole)")
    p.add_argument("--memory-size", type=int, help="tokens kept, FIFO (new memories; default: the model's)")
    p.add_argument("--chunk-size", type=int, help="tokens per chunk (new memories; default: the model's)")
    p.add_argument("--index", choices=["flat", "ivf"], default="flat",
                   help="new memories: flat = exact search (default); ivf = approximate faiss IVF search, for memories "
                        "of hundreds of thousands of tokens and more (recall: BENCHMARKS.md)")
    p.add_argument("--nprobe", type=int, default=64, help="ivf clusters scanned per query (default: 64; recall and speed in BENCHMARKS.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p)
    p.set_defaults(func=_memory_add)
    p = msub.add_parser("list", help="list the memories in the store")
    _common(p, model=False)
    p.set_defaults(func=_memory_list)
    p = msub.add_parser("show", help="one memory's model, tokens, sources and size on disk")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p, model=False)
    p.set_defaults(func=_memory_show)
    p = msub.add_parser("remove", help="delete a memory")
    p.add_argument("name")
    _common(p, model=False)
    p.set_defaults(func=_memory_remove)

    p = sub.add_parser("generate", help="continue a prompt, reading a named memory",
                       description="Generate text with the model's local window plus a named long-term memory.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to continue")
    src.add_argument("--prompt-file", metavar="FILE", help="continue the text of FILE (UTF-8; '-': standard input), "
                                                           "for long or multi-line prompts")
    p.add_argument("--memory", help="name of a memory in the store (see `longmem memory list`)")
    p.add_argument("--no-memory", action="store_true", help="ignore --memory (to compare)")
    p.add_argument("--stop", nargs="*", help="stop when one of these strings is generated")
    _sampling_flags(p)
    _common(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("chat", help="talk over a named memory; --remember adds the conversation to it",
                       description="A line-by-line conversation. Each reply ends at a newline. With --remember the "
                                   "conversation is written into the memory when the chat ends.")
    p.add_argument("--memory", required=True, help="memory name (created with --remember if missing)")
    p.add_argument("--remember", action="store_true", help="write what is said into the memory")
    p.add_argument("--plain", action="store_true", help="lines with the prefixes below even when the model's tokenizer "
                                                        "has a chat template (by default its template frames each turn)")
    p.add_argument("--user-prefix", default="User: ", help="text put before each of your lines (--plain, or a model "
                                                           "without a chat template)")
    p.add_argument("--bot-prefix", default="Reply: ", help="text put before each reply")
    _sampling_flags(p)
    _common(p)
    p.set_defaults(func=_chat)
