"""Crash safety of `longmem serve`: SIGKILL the server at seeded random moments while clients add documents.

Each round starts the real server (a subprocess, the shipped tiny model), runs clients that add documents to
two memories one after another, and SIGKILLs the server (only the process this test started) at a random
moment: during start-up, while an add is being computed, or the moment a memory's atomic write begins
(``NAME.safetensors.tmp-PID`` appears). After every kill: every memory loads (checksums verified), and
every add the server acknowledged (HTTP 200) is in its memory, with its tokens; the next server serves them.

    LONGMEM_KILLS=50 .venv/bin/python -m pytest tests/test_serve_crash.py -s    # more kills (default 4)
    LONGMEM_KILL_SEED=7 ...                                                       # other moments (default 0)
"""

import os
import random
import signal
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from longmem.loading import TINY_MODEL, load_model_and_tokenizer  # noqa: E402
from longmem.store import MemoryStore  # noqa: E402

from test_serve import Server  # noqa: E402

KILLS = int(os.environ.get("LONGMEM_KILLS", "4"))
SEED = int(os.environ.get("LONGMEM_KILL_SEED", "0"))
MEMORIES = ("left", "right")


def document(i: int) -> str:
    rng = random.Random(i)
    words = "alpha beta gamma river castle garden letter morning sister window".split()
    return " ".join(rng.choice(words) if k % 23 else f"Doc{i}x{k}" for k in range(rng.randint(200, 1200))) + "\n"


def test_kill_9_during_adds_loses_no_acknowledged_add_and_leaves_every_memory_loadable(tmp_path, capsys):
    model, _ = load_model_and_tokenizer(TINY_MODEL, "cpu")
    store = MemoryStore(tmp_path / "store")
    rng = random.Random(SEED)
    acknowledged: dict[str, int] = {}  # source -> tokens the server said it stored
    counter = iter(range(10 ** 6))
    kinds: dict[str, int] = {}
    for round_ in range(KILLS + 1):
        server = Server(store=tmp_path / "store")
        stop = threading.Event()

        def add_forever():
            with server.http() as http:
                while not stop.is_set():
                    i = next(counter)
                    name = MEMORIES[i % 2]
                    try:
                        r = http.post(f"/v1/memories/{name}/documents", json={"text": document(i), "source": f"doc{i}"})
                    except httpx.TransportError:  # the server died mid-request: not acknowledged
                        return
                    if r.status_code == 200:
                        acknowledged[f"doc{i}"] = r.json()["tokens_added"]
                    else:
                        assert r.status_code < 500, r.text

        clients = [threading.Thread(target=add_forever) for _ in range(2)]
        for c in clients:
            c.start()
        if round_ == KILLS:  # the last server is stopped gracefully, after a few more adds
            time.sleep(1.0)
            stop.set()
            for c in clients:
                c.join()
            status, err = server.stop()
            assert status == 0, err[-2000:]
            break
        kind = ["start-up", "mid-add", "memory write"][rng.randrange(3)]
        pid = server.proc.pid
        if kind == "start-up":
            time.sleep(rng.uniform(0, 0.3))
        elif kind == "mid-add":
            time.sleep(rng.uniform(0.2, 2.0))
        else:
            deadline = time.time() + 30
            while time.time() < deadline and not any(p.name.endswith(f".tmp-{pid}") for p in store.dir.glob("*")):
                time.sleep(0.001)
        server.proc.send_signal(signal.SIGKILL)  # our own child, by its pid
        server.proc.wait()
        stop.set()
        for c in clients:
            c.join()
        kinds[kind] = kinds.get(kind, 0) + 1
        check(store, model, acknowledged)
    check(store, model, acknowledged)
    assert acknowledged, "no add was ever acknowledged"
    assert [p.name for p in store.dir.iterdir() if ".tmp-" in p.name] == []  # the restarted servers cleaned up
    with capsys.disabled():
        print(f"\n[crash] serve: survived {sum(kinds.values())} SIGKILLs ({kinds}); {len(acknowledged)} acknowledged "
              "adds all present, every memory loads")


def check(store: MemoryStore, model, acknowledged: dict) -> None:
    found = {}
    for name in store.names():
        bank = store.load(name, model)  # verifies the checksum: nothing half-written
        for s in bank.rows[0].sources:
            found[s["file"]] = s["tokens"]
        assert bank.num_tokens(0) + bank.num_pending(0) == sum(s["tokens"] for s in bank.rows[0].sources)
    missing = {s: n for s, n in acknowledged.items() if found.get(s) != n}
    assert not missing, f"acknowledged adds lost: {sorted(missing)[:5]}"
