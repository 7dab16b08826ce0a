"""`longmem serve`: a real uvicorn server in a subprocess (the CLI, the shipped tiny model, a free loopback port),
driven by the real `openai` client, raw HTTP for the bad inputs, lm-eval's `local-completions`, and the CLI for the
parity checks. The crash test and the browser test live in tests/test_serve_crash.py and tests/test_serve_page.py."""

import io
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")  # the extra `longmem[serve]`; `make test` installs it
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from longmem.cli import main  # noqa: E402
from longmem.loading import TINY_MODEL, load_model_and_tokenizer  # noqa: E402
from longmem.model import LongMem  # noqa: E402
from longmem.store import MemoryStore  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
MODEL = "longmem-tiny"
DOC = ("Mr Darcy lives at Pemberley in Derbyshire. Elizabeth Bennet walks to Netherfield in the rain.\n"
       "The pass key is 71432. Remember it: the pass key is 71432.\n") * 8


class Server:
    """`longmem serve` in a subprocess on a free port (``--port 0``; the port is read from its first line)."""

    def __init__(self, *args, store: Path):
        self.store = store
        self.proc = subprocess.Popen([sys.executable, "-m", "longmem.cli", "serve", "--model", MODEL, "--port", "0",
                                      "--store", str(store), "--quiet", *map(str, args)], env=ENV, stderr=subprocess.PIPE,
                                     text=True)
        self.first_line = self.proc.stderr.readline()
        if "http://" not in self.first_line:
            self.proc.kill()
            raise AssertionError(f"the server did not start: {self.first_line}{self.proc.stderr.read()[-3000:]}")
        self.url = self.first_line.split("http://")[1].split("/")[0]
        self.base = f"http://{self.url}"

    def client(self, key="none") -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.base}/v1", api_key=key, max_retries=0, timeout=120)

    def http(self, key=None) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=120, headers={"Authorization": f"Bearer {key}"} if key else {})

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as a service manager stops it: (exit status, what it printed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # our own child, by its pid
        try:
            _, err = self.proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    keys = root / "keys.txt"
    keys.write_text(f"# who may use the server\n{ALICE}  alice\n{BOB}\tbob   # a comment\n")
    server = Server("--api-keys", keys, store=root / "store")
    yield server
    status, err = server.stop()
    assert status == 0 and "stopped" in err, err[-2000:]
    assert "Traceback" not in err, err[-3000:]


@pytest.fixture(scope="module")
def loaded():
    return load_model_and_tokenizer(TINY_MODEL, "cpu")


def greedy(client, prompt, n=16, memory=None):
    extra = {"memory": memory} if memory else None
    return client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, extra_body=extra)


# -- the OpenAI surface ----------------------------------------------------------------------------


def test_models_completions_chat_and_streaming_through_the_openai_client(keyed):
    client = keyed.client(ALICE)
    assert [m.id for m in client.models.list().data] == [MODEL]
    out = greedy(client, "It was a truth universally acknowledged")
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 16
    assert out.choices[0].text and out.model == MODEL
    again = greedy(client, "It was a truth universally acknowledged")
    assert again.choices[0].text == out.choices[0].text  # greedy is deterministic

    streamed = client.completions.create(model=MODEL, prompt="It was a truth universally acknowledged", max_tokens=16,
                                         temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text

    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Where does Mr Darcy live?"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    reply = chat.choices[0].message
    assert reply.role == "assistant" and chat.choices[0].finish_reason in ("stop", "length")
    assert "\n" not in reply.content  # longmem chat's format (no chat template): a reply is one line
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reply.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    sampled = [client.completions.create(model=MODEL, prompt="The", max_tokens=12, temperature=1.0, seed=s).choices[0].text
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]  # a seed fixes the sample

    with keyed.http(ALICE) as http:  # the raw stream ends as OpenAI's does
        r = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 4, "stream": True})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.text.rstrip().endswith("data: [DONE]")


def test_memories_persist_and_two_keys_never_see_each_others(keyed):
    alice, bob = keyed.client(ALICE), keyed.client(BOB)
    with keyed.http(ALICE) as a, keyed.http(BOB) as b:
        assert a.post("/v1/memories", json={"name": "notes"}).status_code == 201
        assert a.post("/v1/memories", json={"name": "notes"}).json()["error"]["code"] == "memory_exists"
        r = a.post("/v1/memories/notes/documents", json={"text": DOC, "source": "pride.txt"})
        assert r.status_code == 200, r.text
        added = r.json()["tokens_added"]
        assert added > 0 and r.json()["tokens"] + r.json()["pending"] == added
        shown = a.get("/v1/memories/notes").json()
        assert shown["tokens"] + shown["pending"] == added and shown["sources"][0]["file"] == "pride.txt"
        assert shown["fingerprint"] and shown["bytes"] > 0
        assert [m["name"] for m in a.get("/v1/memories").json()["data"]] == ["notes"]

        # bob: the same name is simply not there (404, not 403), and his list is empty
        assert b.get("/v1/memories").json()["data"] == []
        for method, path, body in (("GET", "/v1/memories/notes", None), ("DELETE", "/v1/memories/notes", None)):
            r = b.request(method, path, json=body)
            assert r.status_code == 404 and r.json()["error"]["code"] == "memory_not_found", r.text
        with pytest.raises(openai.NotFoundError):
            greedy(bob, "Mr Darcy lives at", memory="notes")
        # bob's own memory of that name is his, and alice's stays as it was
        assert b.post("/v1/memories/notes/documents", json={"text": "Bob's own notes.\n"}).status_code == 200
        assert a.get("/v1/memories/notes").json()["tokens"] == shown["tokens"]

    # the memory changes what the model says (the same prompt without it), and the CLI sees the same store
    with_memory = greedy(alice, "The pass key is", memory="notes").choices[0].text
    assert isinstance(with_memory, str)
    home = keyed.store / "namespaces" / "alice"
    assert MemoryStore(home).names() == ["notes"]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["memory", "show", "notes", "--home", str(home), "--json"]) == 0
    assert json.loads(buf.getvalue())["tokens"] == shown["tokens"]

    with keyed.http(BOB) as b:
        assert b.delete("/v1/memories/notes").json() == {"object": "memory.deleted", "name": "notes", "deleted": True}
        assert b.get("/v1/memories/notes").status_code == 404
    with keyed.http(ALICE) as a:
        assert a.get("/v1/memories/notes").status_code == 200


def test_remember_writes_the_exchange_into_the_memory_after_the_reply(keyed):
    client = keyed.client(ALICE)
    with keyed.http(ALICE) as a:
        assert a.get("/v1/memories/diary").status_code == 404
        chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "My cat is called Tom."}],
                                              max_tokens=8, temperature=0, extra_body={"memory": "diary", "remember": True})
        first = a.get("/v1/memories/diary").json()  # remember created it
        assert first["sources"][0]["file"] == "chat"
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "And my dog is Rex."}],
                                                max_tokens=8, temperature=0, stream=True,
                                                extra_body={"memory": "diary", "remember": True})
        list(stream)
        second = a.get("/v1/memories/diary").json()
        assert len(second["sources"]) == 2
        assert second["tokens"] + second["pending"] > first["tokens"] + first["pending"]
        assert chat.choices[0].message.content is not None
        r = a.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "remember": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "remember"


# -- bad input -------------------------------------------------------------------------------------


def test_every_bad_input_is_an_openai_error_and_the_server_keeps_serving(keyed, tiny_checkpoint):
    other = LongMem.from_pretrained(tiny_checkpoint)  # another model's memory, put where alice's are
    bank = other.new_memory(1)
    other.write_memory(torch.arange(1, 40).view(1, -1) % 90, bank)
    MemoryStore(keyed.store / "namespaces" / "alice").save("foreign", bank)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    cases = [  # (method, path, body: dict or raw bytes, status, error code or None, param or None)
        ("POST", "/v1/completions", b'{"prompt": "x", ', 400, "invalid_json", None),
        ("POST", "/v1/completions", b"[1, 2]", 400, "invalid_json", None),
        ("POST", "/v1/completions", b'{"prompt": "caf\xe9"}', 400, "invalid_encoding", None),
        ("POST", "/v1/completions", b"\xff\xfe\x00", 400, "invalid_encoding", None),
        ("POST", "/v1/completions", {"max_tokens": 2}, 400, "missing_required_parameter", "prompt"),
        ("POST", "/v1/completions", {"prompt": 5}, 400, "invalid_value", "prompt"),
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": "3"}, 400, "invalid_value", "max_tokens"),
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "invalid_value", "max_tokens"),
        ("POST", "/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "invalid_value", "temperature"),
        ("POST", "/v1/completions", {"prompt": "x", "top_p": 0}, 400, "invalid_value", "top_p"),
        ("POST", "/v1/completions", {"prompt": "x", "stop": 7}, 400, "invalid_value", "stop"),
        ("POST", "/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "invalid_value", "stream"),
        ("POST", "/v1/completions", {"prompt": "x", "n": 3}, 400, "invalid_value", "n"),
        ("POST", "/v1/completions", {"prompt": "x", "max_tokens": 10 ** 9}, 400, "max_tokens_exceeded", "max_tokens"),
        ("POST", "/v1/completions", {"prompt": ""}, 400, "empty_prompt", "prompt"),
        ("POST", "/v1/completions", {"prompt": []}, 400, "empty_prompt", "prompt"),
        ("POST", "/v1/completions", {"prompt": [1, 10 ** 7]}, 400, "invalid_token_id", "prompt"),
        ("POST", "/v1/completions", {"prompt": "x" * 200_000}, 400, "context_length_exceeded", "prompt"),
        ("POST", "/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model_not_found", "model"),
        ("POST", "/v1/completions", {"prompt": "x", "memory": "nope"}, 404, "memory_not_found", "memory"),
        ("POST", "/v1/completions", {"prompt": "x", "memory": "foreign"}, 400, "memory_model_mismatch", "memory"),
        ("POST", "/v1/completions", {"prompt": "x", "memory": "../alice"}, 400, "invalid_memory_name", "memory"),
        ("POST", "/v1/completions", {"prompt": "x", "memory": "a/b"}, 400, "invalid_memory_name", "memory"),
        ("POST", "/v1/chat/completions", {**chat, "messages": []}, 400, "invalid_value", "messages"),
        ("POST", "/v1/chat/completions", {**chat, "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value", "messages.0.role"),
        ("POST", "/v1/chat/completions", {**chat, "messages": [{"content": "x"}]}, 400, "missing_required_parameter", "messages.0.role"),
        ("POST", "/v1/chat/completions", {**chat, "memory": "foreign"}, 400, "memory_model_mismatch", "memory"),
        ("POST", "/v1/memories", {"name": "../escape"}, 400, "invalid_memory_name", "name"),
        ("POST", "/v1/memories", {"name": "a/b"}, 400, "invalid_memory_name", "name"),
        ("POST", "/v1/memories", {"name": 3}, 400, "invalid_value", "name"),
        ("POST", "/v1/memories", {"name": "big", "memory_size": 10 ** 12}, 400, "memory_too_large", "memory_size"),
        ("POST", "/v1/memories", {"name": "odd", "memory_size": 6}, 400, "invalid_memory_size", "memory_size"),
        ("GET", "/v1/memories/a%2Fb", None, 400, "invalid_memory_name", "name"),
        ("GET", "/v1/memories/%2E%2E", None, 400, "invalid_memory_name", "name"),
        ("GET", "/v1/memories/..%2F..%2Fkeys.txt", None, 400, "invalid_memory_name", "name"),
        ("DELETE", "/v1/memories/nope", None, 404, "memory_not_found", "name"),
        ("POST", "/v1/memories/notes2/documents", {"text": ""}, 400, "empty_document", "text"),
        ("POST", "/v1/memories/notes2/documents", {"text": ["x"]}, 400, "invalid_value", "text"),
        ("POST", "/v1/memories/a%2Fb/documents", {"text": "x"}, 400, "invalid_memory_name", "name"),
        ("POST", "/v1/nothing", {}, 404, "unknown_url", None),
        ("PUT", "/v1/completions", {}, 405, None, None),
        ("POST", "/v1/completions", b"x" * (9 << 20), 413, "body_too_large", None),
    ]
    with keyed.http(ALICE) as http:
        for method, path, body, status, code, param in cases:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
            r = http.request(method, path, **kw)
            assert r.status_code == status, (method, path, str(body)[:80], r.status_code, r.text[:300])
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
            assert err["code"] == code and err["param"] == param, (path, str(body)[:80], err)
            assert "Traceback" not in r.text
        assert http.get("/v1/memories/foreign").json()["error"]["code"] == "memory_model_mismatch"
    with keyed.http() as anonymous, keyed.http("wrong-key-12345") as wrong:
        for http in (anonymous, wrong):
            r = http.get("/v1/models")
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong-key-12345").models.list()
    assert greedy(keyed.client(ALICE), "Still serving", n=4).choices[0].text is not None
    assert keyed.proc.poll() is None


# -- one decode path: the server says what the CLI says ---------------------------------------------


def test_greedy_output_through_the_server_equals_longmem_generate(keyed):
    with keyed.http(ALICE) as a:
        assert a.post("/v1/memories/book/documents", json={"text": DOC * 6, "source": "book"}).status_code == 200
    home = keyed.store / "namespaces" / "alice"
    client = keyed.client(ALICE)
    for prompt, memory in (("The pass key is", "book"), ("The pass key is", None), ("Elizabeth walks", "book")):
        served = greedy(client, prompt, n=40, memory=memory).choices[0].text
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(["generate", "--model", MODEL, "--prompt", prompt, "--max-new-tokens", "40", "--home", str(home),
                         *(["--memory", memory] if memory else [])]) == 0
        printed = buf.getvalue()
        assert printed.startswith(prompt) and printed.endswith("\n")
        assert served == printed[len(prompt):-1], (prompt, memory)


def test_a_document_added_through_the_server_equals_a_file_added_with_the_cli(keyed, loaded, tmp_path):
    model, _ = loaded
    path = tmp_path / "doc.txt"
    path.write_text(DOC * 3)
    home = keyed.store / "namespaces" / "bob"
    assert main(["memory", "add", "from-cli", str(path), "--model", MODEL, "--home", str(home), "--no-progress"]) == 0
    with keyed.http(BOB) as b:
        assert b.post("/v1/memories/from-server/documents", json={"text": DOC * 3}).status_code == 200
    store = MemoryStore(home)
    cli, served = store.load("from-cli", model), store.load("from-server", model)
    assert cli.num_tokens(0) == served.num_tokens(0) and cli.num_pending(0) == served.num_pending(0)
    torch.testing.assert_close(cli.chronological(0)[0], served.chronological(0)[0])


# -- lm-evaluation-harness's local-completions against the server ---------------------------------


def test_lm_eval_local_completions_scores_as_longmem_eval_harness(keyed, loaded, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from longmem.eval.harness import LongMemLM

    monkeypatch.setenv("OPENAI_API_KEY", ALICE)
    served = LocalCompletionsAPI(base_url=f"{keyed.base}/v1/completions", model=MODEL, tokenizer_backend="huggingface",
                                 tokenizer=str(TINY_MODEL / "backbone"), max_length=257, num_concurrent=1,
                                 batch_size=1)
    local = LongMemLM.from_model(*loaded)
    pairs = [("It was a truth universally", " acknowledged"), ("The pass key is", " 71432"),
             ("Mr Darcy lives at", " Pemberley in Derbyshire."), ("def helper(x):\n    return", " x + 1"),
             ("Review: the garden letter Sentiment:", " positive"), ("Review: the garden letter Sentiment:", " negative")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = served.loglikelihood(requests, disable_tqdm=True)
    want = local.loglikelihood(requests, disable_tqdm=True)
    for (lp, is_greedy), (lp_want, greedy_want), pair in zip(got, want, pairs):
        assert abs(lp - lp_want) < 1e-4, (pair, lp, lp_want)
        assert is_greedy == greedy_want, pair
    assert lm_eval.__version__


# -- the command line ------------------------------------------------------------------------------


def test_serve_refuses_other_hosts_without_keys_and_says_which_extra_is_missing(capsys, tmp_path):
    assert main(["serve", "--host", "0.0.0.0", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "loopback only" in err and "--api-keys" in err
    (tmp_path / "keys").write_text("short ns\n")
    assert main(["serve", "--api-keys", str(tmp_path / "keys"), "--store", str(tmp_path)]) == 2
    assert "at least 8 characters" in capsys.readouterr().err
    code = ("import sys; sys.modules['fastapi'] = None; from longmem.cli import main; "
            "sys.exit(main(['serve', '--port', '0']))")
    r = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "pip install 'longmem[serve]'" in r.stderr


# -- under load ------------------------------------------------------------------------------------


def test_a_full_queue_answers_429_and_a_client_that_leaves_frees_its_slot(tmp_path):
    server = Server("--slots", "1", "--queue", "0", store=tmp_path / "store")  # no keys: loopback, one namespace
    try:
        assert "loopback only" in server.first_line
        client = server.client()
        with server.http() as http:
            long = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4000, "temperature": 0, "stream": True}
            with http.stream("POST", "/v1/completions", json=long) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")  # decoding now, holding the only slot
                busy = http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
                assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
                assert busy.json()["error"]["type"] == "rate_limit_error"
                with pytest.raises(openai.RateLimitError):
                    greedy(client, "x", n=1)
            # the client went away mid-stream: its decode stops at the next token (4000 tokens would take minutes)
            deadline = time.time() + 20
            while http.get("/health").json()["requests"] and time.time() < deadline:
                time.sleep(0.1)
            assert http.get("/health").json()["requests"] == 0
        assert greedy(client, "Once upon a time", n=4).choices[0].text is not None
    finally:
        status, err = server.stop()
    assert status == 0 and "stopped" in err and "Traceback" not in err, err[-3000:]
