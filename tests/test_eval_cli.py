"""`longmem eval ppl` end to end on a tiny checkpoint; the command group's help and one-line errors."""

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch

import longmem
from conftest import code_document
from longmem import LongMem, LongMemConfig, LongMemError
from longmem.cli import main
from longmem.cli.eval import memory_settings
from longmem.io import RESULT_FORMAT, SEAL, verify_result
from longmem.data.streams import encode_documents

FIXTURES = Path(__file__).parent / "fixtures"
DOCS = FIXTURES / "ppl_docs.jsonl"
MODES = ("longmem", "no_memory", "backbone")


@pytest.fixture(scope="module")
def checkpoints(tiny_assets, tmp_path_factory):
    a = tiny_assets
    root = tmp_path_factory.mktemp("ppl")
    cfg = LongMemConfig(chunk_size=2, memory_size=128, topk_chunks=4, segment_length=16)
    for name in ("alpha", "beta"):
        LongMem.from_backbone(a["backbone"], cfg).save_pretrained(root / name, save_backbone=True, tokenizer=a["tokenizer"])
    return root / "alpha", root / "beta"


def test_ppl_three_modes_on_the_same_tokens(checkpoints, cli, tiny_assets, tmp_path, capsys):
    out, png = tmp_path / "ppl.json", tmp_path / "ppl.png"
    assert cli("ppl", "--data", DOCS, "--model", checkpoints[0], "--device", "cpu", "--json", out, "--plot", png,
               "--no-progress") == 0
    printed = capsys.readouterr().out
    assert all(m in printed for m in MODES) and "by document length" in printed
    r = verify_result(out)
    docs = encode_documents([DOCS], tiny_assets["tokenizer"])
    n = sum(len(d) - 1 for d in docs)  # every token but each document's first is predicted once
    for mode in MODES:
        s = r[mode]
        assert s["tokens"] == n and s["tokens_beyond_window"] == sum(len(d) - 16 for d in docs)
        assert s["ppl"] > 1 and s["ppl_beyond_window"] > 1
        only = {"ppl": pytest.approx(s["ppl"]), "ppl_beyond_window": pytest.approx(s["ppl_beyond_window"]),
                "tokens": n, "documents": 2}
        assert s["by_length"] == {"<5K": only}
        assert sum(s["tokens_by_position"].values()) == n
    # the first window has an empty memory: longmem and no_memory agree there, and differ beyond it
    assert math.isclose(r["longmem"]["ppl_by_position"]["0-1"], r["no_memory"]["ppl_by_position"]["0-1"], rel_tol=1e-6)
    assert r["longmem"]["ppl_beyond_window"] != r["no_memory"]["ppl_beyond_window"]
    assert r["meta"]["models"]["alpha"]["documents"] == 2 and png.stat().st_size > 1000


def test_ppl_several_models_and_a_baseline_with_the_same_tokenizer(checkpoints, cli, tiny_assets, tmp_path):
    out = tmp_path / "ppl.json"
    assert cli("ppl", "--data", DOCS, "--model", *checkpoints, "--baseline", tiny_assets["backbone"], "--max-tokens", "100",
               "--batch-size", "2", "--device", "cpu", "--json", out, "--plot", tmp_path / "p.png", "--no-progress") == 0
    r = verify_result(out)
    assert {k for k in r if k != "meta"} == {f"{m}/{x}" for m in ("alpha", "beta") for x in MODES + ("baseline:backbone",)}
    assert r["alpha/longmem"]["tokens"] == 2 * 99  # --max-tokens caps each document
    # the baseline is the very HF model the checkpoints are built on: it equals backbone mode on the same windows
    for m in ("alpha", "beta"):
        assert math.isclose(r[f"{m}/baseline:backbone"]["ppl"], r[f"{m}/backbone"]["ppl"], rel_tol=1e-5)
        assert r[f"{m}/baseline:backbone"]["tokens"] == r[f"{m}/backbone"]["tokens"]
    # batch size does not change the numbers
    one = tmp_path / "one.json"
    assert cli("ppl", "--data", DOCS, "--model", checkpoints[0], "--max-tokens", "100", "--device", "cpu", "--json", one,
               "--no-progress") == 0
    assert math.isclose(verify_result(one)["longmem"]["ppl"], r["alpha/longmem"]["ppl"], rel_tol=1e-5)


def test_ppl_memory_overrides_change_the_longmem_mode_only(checkpoints, cli, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert cli("ppl", "--data", DOCS, "--model", checkpoints[0], "--device", "cpu", "--json", a, "--no-progress") == 0
    assert cli("ppl", "--data", DOCS, "--model", checkpoints[0], "--device", "cpu", "--json", b, "--no-progress",
               "--memory-size", "32", "--topk-chunks", "1") == 0
    ra, rb = verify_result(a), verify_result(b)
    assert ra["backbone"] == rb["backbone"] and ra["no_memory"] == rb["no_memory"]
    assert ra["longmem"]["ppl"] != rb["longmem"]["ppl"] and rb["meta"]["models"]["alpha"]["memory_size"] == 32


def test_ppl_skips_short_documents_and_errors_when_none_is_left(checkpoints, cli, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("alpha beta\n")
    out = tmp_path / "s.json"
    assert cli("ppl", "--data", DOCS, short, "--model", checkpoints[0], "--device", "cpu", "--json", out, "--no-progress") == 0
    assert "skipped 1 document" in capsys.readouterr().err
    assert verify_result(out)["meta"]["models"]["alpha"]["documents"] == 2
    assert cli("ppl", "--data", short, "--model", checkpoints[0], "--device", "cpu") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "longer than one local window" in err[-1] and "Traceback" not in "".join(err)


def test_results_carry_version_and_checksum_and_any_change_is_refused(checkpoints, cli, tmp_path):
    out = tmp_path / "ppl.json"
    assert cli("ppl", "--data", DOCS, "--model", checkpoints[0], "--max-tokens", "40", "--device", "cpu", "--json", out,
               "--no-progress") == 0
    raw = json.loads(out.read_text())
    assert raw["longmem_version"] == longmem.__version__ and raw["format_version"] == RESULT_FORMAT and len(raw["sha256"]) == 64
    report = verify_result(out)
    assert set(raw) - set(report) == set(SEAL) and report["longmem"]["tokens"] == 2 * 39
    data = out.read_bytes()
    for n in range(len(data.rstrip())):  # cut anywhere before the final newline
        out.write_bytes(data[:n])
        with pytest.raises(LongMemError, match="truncated or not JSON"):
            verify_result(out)
    passed = 0
    for i in range(len(data)):  # one bit flipped in every byte
        out.write_bytes(data[:i] + bytes([data[i] ^ (1 << (i % 8))]) + data[i + 1:])
        try:
            got = verify_result(out)
        except LongMemError as e:
            assert "\n" not in str(e)
            continue
        passed += 1
        assert got == report  # only a flip that changes nothing read may pass (1e-05 -> 1E-05)
    assert passed < len(data) // 100


def test_ppl_bad_inputs_are_one_line_errors(checkpoints, cli, tiny_assets, tmp_path, capsys):
    from longmem.data.corpora import train_tokenizer
    from conftest import make_gpt2

    other = tmp_path / "other"
    train_tokenizer([tiny_assets["train"]], vocab_size=280, out=other)
    make_gpt2().save_pretrained(other)
    cases = [
        (["--data", tmp_path / "missing.txt"], "does not exist"),
        (["--data", DOCS, "--baseline", other], "another tokenizer"),
        (["--data", DOCS, "--baseline", tmp_path / "nothing"], "is not a folder"),
        (["--data", DOCS, "--chunk-size", "3"], "multiple of chunk_size"),
        (["--data", DOCS, "--batch-size", "0"], "--batch-size must be at least 1"),
        (["--data", DOCS, "--model", tmp_path], "not a LongMem checkpoint"),
    ]
    for extra, message in cases:
        argv = ["ppl", "--model", checkpoints[0], "--device", "cpu", "--no-progress", *extra]
        capsys.readouterr()
        assert cli(*argv) == 2, message
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and message in err[0], (message, err)


def test_names_per_document_and_in_all_with_json_and_plot(checkpoints, cli, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.py").write_text(code_document(30))
    (docs / "b.txt").write_text("no names are defined here, only prose about memory and recall. " * 80)
    out, png = tmp_path / "names.json", tmp_path / "names.png"
    assert cli("names", "--data", docs, "--model", checkpoints[0], "--device", "cpu", "--context-chars", "200",
               "--memory-size", "4096", "--json", out, "--plot", png, "--no-progress") == 0
    printed = capsys.readouterr().out
    r = verify_result(out)
    a, b = (next(v for k, v in r["documents"].items() if k.endswith(name)) for name in ("a.py", "b.txt"))
    assert a["probes"] == len(a["rows"]) > 0 and b["probes"] == 0
    assert {row["name"] for row in a["rows"]} <= {f"helper_number_{i}" for i in range(30)}
    for k in ("probes", "right_memory", "right_no_memory", "only_with_memory", "only_without_memory"):
        assert r["all"][k] == a[k] + b[k]
    assert a["memory_tokens"] > 128  # --memory-size reached the memory (the checkpoint's own holds 128)
    assert f"{r['all']['probes']:>7}{r['all']['right_memory']:>13}" in printed.splitlines()[-1]
    assert png.stat().st_size > 1000


def test_eval_help_lists_every_task(cli, capsys):
    with pytest.raises(SystemExit) as e:
        cli("--help")
    assert e.value.code == 0
    text = capsys.readouterr().out
    for task in ("ppl", "chapterbreak", "chapterbreak-build", "icl", "passkey", "names"):
        assert task in text
    for task in ("ppl", "chapterbreak", "chapterbreak-build", "icl", "passkey", "names"):
        with pytest.raises(SystemExit):
            cli(task, "--help")
        assert "--" in capsys.readouterr().out


MODEL, MEMORY, OUTPUT = ["--model", "--device", "--dtype"], ["--memory-size", "--chunk-size", "--topk-chunks"], \
    ["--json", "--plot", "--no-progress"]
OPTIONS = {  # each task's options, in the order of its --help (the shared ones are declared once in longmem.cli.eval)
    "ppl": ["--data", *MODEL, "--baseline", "--max-tokens", "--batch-size", *MEMORY, *OUTPUT],
    "chapterbreak": ["--data", "--split", "--max-examples", "--max-candidate-tokens", "--max-context-tokens", *MODEL,
                     *MEMORY, *OUTPUT],
    "chapterbreak-build": ["--book", "--out", "--id", "--data-root", "--split", "--negatives", "--context-chars",
                           "--candidate-words", "--max-examples", "--seed"],
    "icl": ["--task", "--data", "--train", "--k", "--memory-demos", "--seeds", "--seed", "--max-test", *MODEL, *MEMORY,
            *OUTPUT],
    "passkey": ["--distances", "--trials", "--candidates", "--max-new-tokens", "--seed", "--full-context", *MODEL,
                *MEMORY, *OUTPUT],
    "facts": ["--text", "--tokens", *MODEL, *OUTPUT],
    "names": ["--data", "--memory-frac", "--context-chars", "--min-chars", "--new-tokens", *MODEL, *MEMORY, *OUTPUT],
    "harness": ["--tasks", "--model-args", "--memory", "--include-path", "--num-fewshot", "--limit", "--metadata",
                "--output", "--no-progress"],
}


@pytest.mark.parametrize("task", sorted(OPTIONS))
def test_each_task_lists_its_options(task, cli, capsys):
    with pytest.raises(SystemExit) as e:
        cli(task, "--help")
    assert e.value.code == 0
    assert re.findall(r"^  (--[a-z][\w-]*)", capsys.readouterr().out, flags=re.MULTILINE) == OPTIONS[task]


def test_memory_sizes_come_back_checked_against_the_model(checkpoints):
    model = LongMem.from_pretrained(checkpoints[0])  # chunk size 2
    given = argparse.Namespace(memory_size=64, chunk_size=None, topk_chunks=2)
    assert memory_settings(model, given) == {"memory_size": 64, "topk_chunks": 2}
    assert memory_settings(model, argparse.Namespace(memory_size=None, chunk_size=None, topk_chunks=None)) == {}
    with pytest.raises(LongMemError, match="multiple of chunk_size"):
        memory_settings(model, argparse.Namespace(memory_size=63, chunk_size=None, topk_chunks=None))


def test_bad_device_is_a_one_line_error(checkpoints, cli, capsys):
    assert cli("passkey", "--model", checkpoints[0], "--device", "tpu") == 2
    assert "unknown device 'tpu'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli("passkey", "--model", checkpoints[0], "--device", "cuda") == 2
        assert "no CUDA GPU is available" in capsys.readouterr().err
