"""``longmem serve``: the OpenAI-compatible server (``longmem.serve``) under uvicorn until Ctrl-C or SIGTERM."""

from __future__ import annotations

import importlib
import ipaddress
import signal
import socket
import sys
from pathlib import Path

from longmem.errors import LongMemError
from longmem.loading import DEFAULT_MODEL, load_model_and_tokenizer, resolve_device
from longmem.store import default_home

# FastAPI and uvicorn are the optional extra `longmem[serve]`: ``longmem.serve`` is loaded by name when `serve`
# runs, so every other command works (and starts quickly) without them. tests/test_layering.py allows this import.
SERVE_MODULE = "longmem.serve"


def load_server():
    """(the ``longmem.serve`` module, uvicorn), or one line saying which extra to install."""
    try:
        return importlib.import_module(SERVE_MODULE), importlib.import_module("uvicorn")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("fastapi", "uvicorn", "starlette", "pydantic"):
            raise
        raise LongMemError(f"longmem serve needs FastAPI and uvicorn ({e.name} is missing); "
                           "install them with pip install 'longmem[serve]'") from None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """The listening socket (port 0: a free one), or one line saying why it cannot be had."""
    if not 0 <= port <= 65535:
        raise LongMemError(f"--port must be in 0..65535, got {port}")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror:
        raise LongMemError(f"--host {host}: not an address or a known host name") from None
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(info[4])
    except OSError as e:
        sock.close()
        raise LongMemError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _serve(args) -> int:
    serve, uvicorn = load_server()
    if args.api_keys is None and not is_loopback(args.host):
        raise LongMemError(f"--host {args.host}: without --api-keys the server binds to loopback only (127.0.0.1, ::1, "
                           "localhost); give --api-keys FILE to serve other machines")
    keys = serve.read_api_keys(args.api_keys) if args.api_keys else None
    limits = serve.Limits(slots=args.slots, queue=args.queue, max_tokens=args.max_tokens,
                          max_prompt_tokens=args.max_prompt_tokens)
    device = resolve_device(args.device)
    store = Path(args.store) if args.store else default_home()
    sock = bind(args.host, args.port)  # before the slow part: a port in use is said at once
    model, tok = load_model_and_tokenizer(args.model, device, dtype=args.dtype)
    model_id = Path(args.model).resolve().name if args.model else DEFAULT_MODEL.name
    engine = serve.Engine(model, tok, store, model_id, limits)
    app = serve.create_app(engine, keys)
    host, port = sock.getsockname()[:2]
    who = (f"API keys from {args.api_keys} ({len(keys)} key(s), {len(set(keys.values()))} namespace(s))" if keys
           else "no API keys: bound to loopback only")
    print(f"longmem serve: {model_id} on http://{host if ':' not in host else f'[{host}]'}:{port}/ ({who}; memories in "
          f"{store}); Ctrl-C stops", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level="warning" if args.quiet else "info", timeout_graceful_shutdown=5,
                            access_log=not args.quiet)
    # uvicorn stops gracefully on Ctrl-C / SIGTERM, then raises the signal again under the handlers it found: these
    # (doing nothing) make that a clean exit with status 0 instead of a KeyboardInterrupt or death by SIGTERM
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run(sockets=[sock])
    print("longmem serve: stopped", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with named memories per API key",
                       description="Serve a LongMem model over the OpenAI HTTP API (/v1/models, /v1/completions, "
                                   "/v1/chat/completions) with named memories (/v1/memories) and a chat page at /. "
                                   "Needs pip install 'longmem[serve]'.")
    p.add_argument("--model", help="LongMem checkpoint folder (default: the shipped default, longmem-tiny; or a shipped model's name, e.g. smollm2-135m-longmem)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; another than "
                                                       "loopback needs --api-keys)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: a free one, printed at start)")
    p.add_argument("--api-keys", metavar="FILE", help="file of 'KEY NAMESPACE' lines: each key sees only its "
                                                      "namespace's memories (default: no keys, loopback only)")
    p.add_argument("--store", metavar="DIR", help="memory store folder (default: $LONGMEM_HOME or "
                                                  "~/.local/share/longmem, as `longmem memory`)")
    p.add_argument("--device", help="cpu or cuda (default: a GPU when there is one)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="weights' type after loading (default: as stored)")
    p.add_argument("--slots", type=int, default=2, help="requests decoded at once (default: 2)")
    p.add_argument("--queue", type=int, default=16, help="requests waiting for a slot before 429 (default: 16)")
    p.add_argument("--max-tokens", type=int, default=4096, help="new tokens one request may ask for (default: 4096)")
    p.add_argument("--max-prompt-tokens", type=int, default=32768, help="tokens of one prompt (default: 32768)")
    p.add_argument("--quiet", action="store_true", help="no access log")
    p.set_defaults(func=_serve)
