"""Smoke tests of the benchmark scripts: each one's quick mode runs and writes the documented JSON.

They check the shape of the results (fields present, figures finite and positive, targets well
formed), never the figures themselves: speed depends on the machine. The schema is the one
documented in benchmarks/README.md.
"""

import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

MACHINE_FIELDS = ("cpu", "cores", "torch_threads", "torch", "faiss", "device", "date_utc", "load_avg_1m_start")
TARGET_FIELDS = ("name", "value", "op", "threshold", "met", "note")

# benchmark -> (fields of every row of "results" that must be finite and > 0, other top-level keys)
SCHEMA = {
    "retrieval": (("tokens", "chunks", "median_ms"), ("approximate",)),
    "adaptation_step": (("median_ms", "min_ms", "max_ms", "tok_per_s", "ratio"), ("split",)),
    "ingest": (("median_ms", "min_ms", "tok_per_s", "vs_hf_forward"), ()),
    "generation": (("tokens", "tok_per_s", "ms_per_token", "vs_no_memory"), ()),
    "footprint": (("memory_size", "stored_tokens", "nbytes", "bytes_per_token", "raw_bytes_per_token", "ratio"),
                  ("fill", "steps")),
    "stream_rss": (("file_mb", "read_mb", "seconds", "mb_per_s", "memory_bank_mib", "peak_rss_mib"), ("samples",)),
    "scale": (("gpus", "backbone_params", "sidenet_params", "trained_params", "total_gb", "total_ckpt_gb"), ("agreement",)),
    "harness_prefix": (("median_s", "first_s", "total_s", "tokens_written", "speedup"), ("identical_scores",)),
    "real_size": (("median_ms", "min_ms", "max_ms", "tok_per_s", "ratio"), ("training_configs", "skipped")),
}


@pytest.fixture
def restore_torch_state():
    """The scripts set threads and seeds for their process; give the rest of the test session its own back."""
    import faiss

    threads, faiss_threads, rng = torch.get_num_threads(), faiss.omp_get_max_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(faiss_threads)
    torch.set_rng_state(rng)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def run_quick(name, tmp_path, *extra):
    module = importlib.import_module(name)
    out = tmp_path / f"{name}.json"
    # one thread: the smoke test must stay fast even on a machine busy with another job
    payload = module.main(["--quick", "--threads", "1", "--repeats", "1", "--json", str(out), *extra])
    assert out.is_file()
    data = json.loads(out.read_text())
    assert data["benchmark"] == payload["benchmark"] == name
    return data


@pytest.mark.parametrize("name", [n for n in SCHEMA if n not in ("stream_rss", "real_size")])  # own tests below
def test_quick_mode_writes_documented_json(name, tmp_path, restore_torch_state):
    check_documented_json(name, run_quick(name, tmp_path))


def check_documented_json(name, data):
    row_fields, keys = SCHEMA[name]
    assert data["mode"] == "quick"
    assert data["command"].startswith(f"python benchmarks/{name}.py --quick")
    for f in MACHINE_FIELDS:
        assert f in data["machine"], f"machine lacks {f}"
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch_threads"] == 1
    assert isinstance(data["config"], dict) and data["config"]
    assert positive(data["wall_s"])
    assert data["results"], "no result rows"
    for row in data["results"]:
        for f in row_fields:
            assert positive(row.get(f)), f"{name}: row {row} has no finite positive {f!r}"
        for k, v in row.items():
            if isinstance(v, float):
                assert math.isfinite(v) and v >= 0, f"{name}: {k}={v} in {row}"
    for k in keys:
        assert data[k], f"{name}: empty {k!r}"
    assert data["targets"], "every benchmark checks at least one target"
    for t in data["targets"]:
        assert set(TARGET_FIELDS) <= set(t)
        assert positive(t["value"]) and positive(t["threshold"]) and t["op"] in ("<=", ">=")
        assert t["met"] == (t["value"] <= t["threshold"] if t["op"] == "<=" else t["value"] >= t["threshold"])


def test_memory_add_streams_a_file_in_bounded_memory(tmp_path, restore_torch_state):
    """The real `longmem memory add` on 1 MiB and 2 MiB files: the peak resident memory does not grow with the
    file (tokenizing it whole would add ~150 MiB per MiB of text), but does with the memory's size."""
    data = run_quick("stream_rss", tmp_path)
    check_documented_json("stream_rss", data)
    one, two, big = data["results"][:3]
    assert one["complete"] and two["complete"] and big["complete"] and two["file_mb"] == pytest.approx(2 * one["file_mb"])
    assert two["peak_rss_mib"] < 1.2 * one["peak_rss_mib"] + 16
    assert two["growth_mib"] < one["growth_mib"] + 16  # MiB: far less than the file added
    assert big["growth_mib"] > one["growth_mib"] + 0.5 * (big["memory_bank_mib"] - one["memory_bank_mib"])
    assert {s["run"] for s in data["samples"]} == {r["run"] for r in data["results"]}


def test_retrieval_bank_agrees_with_bare_faiss_and_reports_recall(tmp_path, restore_torch_state):
    data = run_quick("retrieval", tmp_path, "--sizes", "1024", "8192", "--ann-sizes", "8192", "--queries", "64")
    searches = [r for r in data["results"] if r["method"].startswith("bank.search [")]
    assert {r["method"] for r in searches} == {"bank.search [faiss]", "bank.search [torch]"}
    assert all(r["agree_exact"] == 1.0 for r in searches if "faiss" in r["method"])  # same exact search, same result
    for r in data["approximate"]:
        assert 0 <= r["recall"] <= 1 and positive(r["search_ms"]) and positive(r["build_s"])
    ivf = [r for r in data["approximate"] if r["index"] == "bank.search [ivf]"]
    # the library's own ivf path, really trained at 2,048 chunks (nlist 45), and partial below nprobe = nlist
    assert ivf and all(r["trained"] and r["recall"] < 1.0 for r in ivf)


def test_real_checkpoint_paths(tmp_path, tiny_checkpoint, tiny_assets, restore_torch_state):
    """--model (a saved LongMem folder with its tokenizer) and retrieval's real memories of real text."""
    data = run_quick("retrieval", tmp_path, "--sizes", "256", "--real-keys", str(tiny_checkpoint),
                     "--text", str(tiny_assets["train"]))
    assert data["config"]["data"].startswith("real:") and data["config"]["heads"] == 2  # the tiny Llama's kv heads
    assert data["approximate"] and all(0 <= r["recall"] <= 1 for r in data["approximate"])
    data = run_quick("ingest", tmp_path, "--model", str(tiny_checkpoint), "--tokens", "300")
    assert data["config"]["tokenizer"] == "checkpoint's" and data["results"][0]["tok_per_s"] > 0


def test_run_all_summary_and_markdown(tmp_path):
    import run_all

    res = {"benchmark": "x", "mode": "quick", "machine": {"cpu": "c", "torch_threads": 1, "load_avg_1m_start": 0.1,
                                                          "date_utc": "2026-01-01T00:00:00+00:00"},
           "targets": [{"name": "t", "value": 1.2, "op": "<=", "threshold": 1.3, "met": True, "note": "n"}]}
    path = tmp_path / "x.json"
    path.write_text(json.dumps(res))
    summary = run_all.summarize([path, tmp_path / "missing.json"])
    assert "| x | quick | t | 1.2 | <= 1.3 | yes |" in summary and "missing" in summary
    md = tmp_path / "B.md"
    md.write_text(f"# title\n\n{run_all.BEGIN}\nold\n{run_all.END}\n\nkept\n")
    run_all.update_markdown(md, summary)
    text = md.read_text()
    assert "old" not in text and "| x | quick | t |" in text and text.startswith("# title") and "kept" in text


def test_scale_plan_matches_measured_allocations_and_sharding_divides(tmp_path, restore_torch_state):
    """The plan's per-GPU arithmetic agrees with what a small real model allocates, and more FSDP processes
    never need more memory per GPU than fewer (DDP the most)."""
    data = run_quick("scale", tmp_path)
    assert all(t["met"] for t in data["targets"]), data["targets"]
    for model in {r["model"] for r in data["results"]}:
        total = {r["strategy"]: r["total_gb"] for r in data["results"] if r["model"] == model}
        assert total["ddp"] > total["fsdp-2"] > total["fsdp-4"] > total["fsdp-8"] > total["fsdp-8 +shard-backbone"]
        assert total["ddp +lora16"] < total["ddp"]


def test_real_size_times_every_path_and_training_configuration(tmp_path, restore_torch_state):
    """Quick mode of the real-size benchmark on a tiny identity-start model: every part at both precisions and
    memory sizes, each training configuration (with the blocks it skips), the profile, llama.cpp's skip reason."""
    data = run_quick("real_size", tmp_path, "--profile", "--profile-steps", "1")
    check_documented_json("real_size", data)
    rows = data["results"]
    for precision in ("fp32", "bf16"):
        mine = [r for r in rows if r["precision"] == precision]
        assert {r["part"] for r in mine} == {"ingest", "window", "decode", "adaptation"}
        steps = {(r["case"], r["memory"], r["segment"]) for r in mine if r["part"] == "adaptation"}
        assert steps >= {(c, M, T) for c in ("full", "from-j", "lora", "block-j", "full+ckpt", "block-j, 8 tokens scored",
                                             "from-j, 8 tokens scored") for M in (1024, 4096) for T in (32, 64)}
        assert {r["case"] for r in mine if r["part"] == "decode"} >= {"HF generate (KV cache)", "PlainBackbone (same Decoder)",
                                                                      "longmem, 4,096-token memory"}
    configs = {(c["precision"], c["config"]): c for c in data["training_configs"]}
    assert configs["fp32", "full"]["skipped_blocks"] == [] and configs["fp32", "block-j"]["skipped_blocks"] == [0]
    assert configs["fp32", "lora"]["trainable_params"] < configs["fp32", "block-j"]["trainable_params"] < configs["fp32", "full"]["trainable_params"]
    assert configs["fp32", "full+ckpt"]["grad_checkpointing"]
    assert data["skipped"] == [{"part": "llama.cpp", "reason": "the model has random weights: there is no GGUF file to give llama.cpp"}]
    profile = Path(data["profile"]).read_text()
    assert profile.count("== adaptation step:") == 10 and "memory.search" in profile  # 5 configurations x 2 precisions
