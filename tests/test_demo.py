"""`longmem demo` on a tiny trained-by-us model, offline."""

import json

from conftest import code_document
from longmem import LongMem
from longmem.cli import main


def test_demo_runs_and_writes_the_documented_json(tiny_assets, tmp_path, capsys):
    a = tiny_assets
    run = tmp_path / "run"
    assert main(["train", "--backbone", str(a["backbone"]), "--data", str(a["train"]), "--out", str(run),
                 "--max-steps", "2", "--batch-size", "2", "--segment-length", "16", "--memory-size", "128",
                 "--chunk-size", "2", "--topk-chunks", "4", "--eval-every", "0", "--no-progress"]) == 0
    model = LongMem.from_pretrained(run)
    model.save_pretrained(tmp_path / "shipped", save_backbone=True, tokenizer=a["tokenizer"])
    capsys.readouterr()
    out = tmp_path / "demo.json"
    doc = sorted(a["val"].iterdir())[0]
    assert main(["demo", "--model", str(tmp_path / "shipped"), "--data", str(doc), "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "ppl beyond window" in printed and "no_memory" in printed
    r = json.loads(out.read_text())
    for mode in ("longmem", "no_memory", "backbone"):
        assert {"ppl", "ppl_beyond_window", "tokens"} <= set(r[mode])
        assert r[mode]["tokens"] == r["longmem"]["tokens"] > 16
    assert r["example"] is None or r["example"]["distance"] > 16
    assert r["identifiers"] is None  # the name probe runs with --names only
    rc = r["recall"]  # None where the window cannot hold the question and its answer
    assert rc is None or (rc["distance"] > 16 and {"longmem", "no_memory"} <= set(rc) and "recall: a pass key" in printed)


def test_demo_on_code_probes_names_defined_in_the_first_half(tiny_checkpoint, tmp_path, capsys):
    doc = tmp_path / "code.py"
    doc.write_text(code_document(40))
    capsys.readouterr()
    assert main(["demo", "--names", "--model", str(tiny_checkpoint), "--data", str(doc), "--json", str(tmp_path / "d.json"),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    idr = json.loads((tmp_path / "d.json").read_text())["identifiers"]
    assert idr["probes"] > 0 and {r["name"] for r in idr["rows"]} <= {f"helper_number_{i}" for i in range(40)}
    n = idr["probes"]
    assert f"completed exactly: with memory {idr['right_memory']}/{n}, without {idr['right_no_memory']}/{n}" in printed


def test_demo_on_a_missing_model_is_a_one_line_error(tmp_path, capsys):
    assert main(["demo", "--model", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert "not a LongMem checkpoint" in err and "Traceback" not in err
