"""Pretraining end to end on a tiny Llama (2 layers, hidden 32, seq 32) through the real CLI."""

import json
import math
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from longmem.training import pretrain as P  # noqa: E402
from longmem.cli import main  # noqa: E402
from longmem.data.corpora import train_tokenizer  # noqa: E402
from longmem.errors import LongMemError  # noqa: E402
from longmem.loading import load_tokenizer  # noqa: E402
from longmem.training.step import lr_factor  # noqa: E402

TINY = ["--layers", "2", "--hidden", "32", "--heads", "4", "--kv-heads", "2",
        "--intermediate", "64", "--seq-len", "32", "--batch-size", "4", "--warmup", "2",
        "--log-every", "1", "--eval-every", "3", "--save-every", "3", "--eval-tokens", "256",
        "--precision", "fp32"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    books = ("It is a truth universally acknowledged, that a single man in possession of a good "
             "fortune, must be in want of a wife.\n")
    code = "def add(a, b):\n    return a + b\n\n"
    for name, text in (("books", books), ("code", code)):
        (root / name).mkdir()
        for split, reps in (("train", 60), ("validation", 20)):
            rows = [{"id": f"{name}{i}", "text": f"{i} " + text * reps} for i in range(3)]
            (root / name / f"{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows))
    train_tokenizer([root / "books" / "train.jsonl", root / "code" / "train.jsonl"], 300,
                    root / "tok")
    return root


def args(corpus, out, *extra):
    return ["pretrain", "--data", str(corpus / "books" / "train.jsonl"),
            str(corpus / "code" / "train.jsonl"), "--tokenizer", str(corpus / "tok"),
            "--out", str(out), *TINY, *extra]


def test_pretrain_end_to_end_saves_a_loadable_model(corpus, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "6")) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (2, 32, 2)
    assert cfg.vocab_size == len(tok) == 300
    assert cfg.eos_token_id == cfg.bos_token_id == cfg.pad_token_id == tok.eos_token_id
    assert cfg.tie_word_embeddings
    assert (out / "model.safetensors").exists() and (out / "loss.png").stat().st_size > 1000
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"val/books/validation", "val/code/validation"} <= set(records[-1])
    assert records[-1]["stopped"] == "max_steps"
    ids = tok("a single man", return_tensors="pt")["input_ids"]
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 5)


@pytest.mark.parametrize("written", ["now", "before rng_state"])
def test_killed_run_resumes_exactly(corpus, tmp_path, monkeypatch, written):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert main(args(corpus, full, "--max-steps", "7")) == 0

    real_save = P.save_checkpoint

    def save_then_die(path, state):  # the process dies right after the step-3 checkpoint
        real_save(path, state)
        raise SystemExit("killed")

    monkeypatch.setattr(P, "save_checkpoint", save_then_die)
    with pytest.raises(SystemExit):
        main(args(corpus, killed, "--max-steps", "7"))
    monkeypatch.setattr(P, "save_checkpoint", real_save)
    state = torch.load(killed / "checkpoint" / "state.pt", weights_only=False)
    assert set(state["rng"]) == {"cpu"}  # on a GPU also "cuda"
    if written == "before rng_state":  # the CPU generator's state alone, under its old name
        state["torch_rng"] = state.pop("rng")["cpu"]
        torch.save(state, killed / "checkpoint" / "state.pt")
    assert main(args(corpus, killed, "--max-steps", "7")) == 2  # refuses without --resume
    assert main(args(corpus, killed, "--max-steps", "7", "--resume")) == 0

    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def losses(out):
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r.get("loss"), r.get("val/books/validation")) for r in rows]

    assert losses(full) == losses(killed)


def test_max_minutes_stops_cleanly_and_saves(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "1000", "--max-minutes", "0.0001")) == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["stopped"] == "max_minutes" and last["step"] < 1000
    assert (out / "model.safetensors").exists() and (out / "checkpoint" / "state.pt").exists()


@pytest.mark.parametrize("extra, match", [
    (["--seq-len", "100000"], "exceeds max positions"),
    (["--heads", "3"], "not divisible"),
    (["--precision", "fp32", "--lr", "2"], "--lr must be"),
    (["--weights", "1"], "--weights has 1 values for 2 --data sets"),
    (["--weights", "1", "-1"], "--weights must be finite"),
    (["--weights", "0", "0"], "not all 0"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "torch sees no GPU here")]))
def test_bad_shapes_and_settings_are_one_line_errors(corpus, tmp_path, capsys, extra, match):
    assert main(args(corpus, tmp_path / "run", "--max-steps", "1", *extra)) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_bad_inputs(corpus, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    base = ["pretrain", "--tokenizer", str(corpus / "tok"), "--out", str(tmp_path / "o"), *TINY]
    assert main([*base, "--data", str(short), "--max-steps", "1"]) == 2
    assert "fewer than one training sequence" in capsys.readouterr().err
    assert main(["pretrain", "--data", str(short), "--tokenizer", str(tmp_path / "none"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "longmem tokenizer" in capsys.readouterr().err
    first = tmp_path / "first"
    assert main(args(corpus, first, "--max-steps", "3")) == 0
    changed = args(corpus, first, "--max-steps", "3", "--resume")
    changed[changed.index("--hidden") + 1] = "48"
    assert main(changed) == 2  # a hidden-32 checkpoint cannot resume into hidden 48
    assert "different hidden;" in capsys.readouterr().err


def test_evaluate_matches_hf_loss_and_perplexity_cli(corpus, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert main(args(corpus, out, "--max-steps", "2")) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    stream = torch.arange(3 * 32 + 5) % 300  # three windows of 32 predicted tokens
    loss, n = P.evaluate(model, stream, seq_len=32, max_tokens=None, batch_size=2)
    windows = torch.stack([stream[i * 32: i * 32 + 33] for i in range(3)])[None]
    ref = torch.stack([model(input_ids=w, labels=w).loss for w in windows[0][:, None]]).mean()
    assert n == 96
    assert loss == pytest.approx(ref.item(), rel=1e-5)

    val = corpus / "books" / "validation.jsonl"
    report = tmp_path / "ppl.json"
    assert main(["perplexity", "--model", str(out), "--data", str(val), "--seq-len", "32",
                 "--json", str(report)]) == 0
    r = json.loads(report.read_text())["books/validation"]
    assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-3)
    assert "books/validation: loss" in capsys.readouterr().out


def test_lr_schedule_warms_up_then_decays_to_floor():
    f = [lr_factor(s, warmup=10, total=100, decay="cosine", final=0.1) for s in range(120)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[100] == pytest.approx(0.1) and f[119] == pytest.approx(0.1)


def test_sample_batch_takes_contiguous_windows_from_every_stream():
    streams = [torch.arange(0, 100), torch.arange(1000, 1050)]
    gen = torch.Generator().manual_seed(0)
    batch = P.sample_batch(streams, batch_size=64, seq_len=8, gen=gen)
    assert batch.shape == (64, 9)
    assert torch.all(batch[:, 1:] - batch[:, :-1] == 1)  # contiguous
    from_second = (batch[:, 0] >= 1000).float().mean().item()
    assert 0.3 < from_second < 0.7  # rows pick their stream uniformly, not by size
    again = P.sample_batch(streams, 64, 8, torch.Generator().manual_seed(0))
    assert torch.equal(batch, again)


def test_export_backbone_writes_only_the_model(corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    run, dest = tmp_path / "run", tmp_path / "backbone"
    assert main(args(corpus, run, "--max-steps", "3")) == 0
    assert main(["export-backbone", "--run", str(run), "--out", str(dest)]) == 0
    names = sorted(p.name for p in dest.iterdir())
    assert "checkpoint" not in names and not [n for n in names if n.endswith(".tmp")]
    assert {"config.json", "model.safetensors", "tokenizer.json", "pretrain-metrics.jsonl",
            "pretrain-loss.png"} <= set(names)
    a = AutoModelForCausalLM.from_pretrained(run)
    b = AutoModelForCausalLM.from_pretrained(dest)
    ids = torch.arange(10)[None]
    assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    assert main(["export-backbone", "--run", str(tmp_path / "nothing"), "--out", str(dest)]) == 2


def test_sample_batch_weights_choose_streams_in_proportion():
    streams = [torch.arange(0, 100), torch.arange(1000, 1050), torch.arange(5000, 5100)]
    batch = P.sample_batch(streams, 400, 8, torch.Generator().manual_seed(0), weights=[0.8, 0.2, 0.0])
    first = (batch[:, 0] < 1000).float().mean().item()
    assert 0.7 < first < 0.9 and not (batch[:, 0] >= 5000).any()  # a weight of 0 is never drawn
    again = P.sample_batch(streams, 400, 8, torch.Generator().manual_seed(0), weights=[0.8, 0.2, 0.0])
    assert torch.equal(batch, again)


def test_token_stream_batches_pieces_of_many_documents_without_changing_ids(corpus, tmp_path):
    tok = load_tokenizer(str(corpus / "tok"))
    docs = [{"text": "def f(x):\n    return x\n" * (i + 1)} for i in range(40)] + [{"text": ""}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))
    eos = tok.eos_token_id
    want = []
    for d in docs:  # one document at a time, as before batching
        want += tok.backend_tokenizer.encode(d["text"], add_special_tokens=False).ids + [eos]
    for batch in (1, 3, 256):
        assert P.token_stream(str(path), tok, batch=batch).tolist() == want


def test_init_from_continues_an_exported_backbone_and_refuses_another_shape(corpus, tmp_path, capsys):
    run, dest = tmp_path / "run", tmp_path / "backbone"
    assert main(args(corpus, run, "--max-steps", "6")) == 0
    assert main(["export-backbone", "--run", str(run), "--out", str(dest)]) == 0
    cont, fresh = tmp_path / "cont", tmp_path / "fresh"
    assert main(args(corpus, cont, "--max-steps", "1", "--lr", "1e-9", "--init-from", str(dest))) == 0
    assert main(args(corpus, fresh, "--max-steps", "1", "--lr", "1e-9")) == 0
    from safetensors.torch import load_file

    want, got, rand = (load_file(str(d / "model.safetensors")) for d in (dest, cont, fresh))
    for name, w in want.items():  # one step at lr 1e-9 from the exported weights, not from a random init
        assert torch.allclose(got[name], w, atol=1e-6), name
    assert not all(torch.allclose(rand[n], w, atol=1e-3) for n, w in want.items())
    wide = args(corpus, tmp_path / "wide", "--max-steps", "1", "--init-from", str(dest))
    wide[wide.index("--hidden") + 1] = "48"
    assert main(wide) == 2
    err = capsys.readouterr().err
    assert "does not have this model's shape" in err.splitlines()[-1] and "Traceback" not in err
    assert main(args(corpus, tmp_path / "none", "--max-steps", "1", "--init-from", str(tmp_path / "nothing"))) == 2
    assert "no model.safetensors there" in capsys.readouterr().err


def test_validation_runs_every_eval_every_steps_even_off_the_log_grid(corpus, tmp_path):
    out = tmp_path / "run"
    cli = args(corpus, out, "--max-steps", "7")
    cli[cli.index("--log-every") + 1], cli[cli.index("--eval-every") + 1] = "5", "3"
    assert main(cli) == 0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "val/books/validation" in r and "loss" in r] == [3, 6]
    assert [r["step"] for r in recs if "loss" in r] == [3, 5, 6, 7]
