"""longmem.eval.recall: identifiers defined in the part of a document that only the memory holds."""

import numpy as np
import pytest
import torch

from conftest import code_document
from longmem import LongMem
from longmem.eval.recall import defined_names, identifier_recall, probe_sites

HEAD = "import os\n\nclass ZorbleCache:\n    pass\n\ndef frobnicate_all(x):\n    self.widget_count = 1\n    len = 3\n"
FILLER = "".join(f"value_{i} = {i}\n" for i in range(200))
LATER = "y = frobnicate_all(2)\n" + FILLER + "z = frobnicate_all(3) + ZorbleCache()\n" + FILLER + "w = widget_count\n"


def test_probes_use_names_only_memory_holds():
    text = HEAD + FILLER + LATER
    cut = len(HEAD) + len(FILLER)
    names = defined_names(text[:cut], 6)
    assert {"ZorbleCache", "frobnicate_all", "widget_count"} <= set(names)
    assert "len" not in names and "import" not in names  # builtins, keywords and short names are not probes
    got = probe_sites(text, cut, ["ZorbleCache", "frobnicate_all", "widget_count"], 600)
    for name, pos in got:
        assert pos >= cut + 600 and text[pos:pos + len(name)] == name
        assert name not in text[pos - 600:pos]  # the prompt does not hold the name: only the memory does
    # the use right after the cut is too close to it to have a whole prompt after the cut; the second one is taken
    assert dict(got)["frobnicate_all"] == text.index("z = frobnicate_all") + 4
    assert [n for n, _ in got] == ["frobnicate_all", "ZorbleCache", "widget_count"]


@pytest.fixture(scope="module")
def model_and_tok(tiny_checkpoint):
    from longmem.loading import load_tokenizer

    return LongMem.from_pretrained(tiny_checkpoint, memory_size=8192).eval(), load_tokenizer(str(tiny_checkpoint / "backbone"))


def test_rows_are_scored_as_stated_and_the_memory_holds_the_first_part(model_and_tok):
    model, tok = model_and_tok
    text = code_document()
    r = identifier_recall(model, tok, text, context_chars=300, new_tokens=6)
    cut = text.rfind("\n", 0, len(text) // 2) + 1
    n = len(tok.backend_tokenizer.encode(text[:cut], add_special_tokens=False).ids)
    csz = model.config.chunk_size
    assert r["memory_tokens"] == n // csz * csz  # whole chunks stored; the last partial one waits for more
    assert r["probes"] == len(r["rows"]) > 0
    for row in r["rows"]:
        assert row["used_at"] >= cut + 300 and row["defined_at"] < cut
        assert row["name"].startswith(row["cue"]) and row["cue"] != row["name"]
        rest = row["name"][len(row["cue"]):]
        for k in ("memory", "no_memory"):
            assert row[f"right_{k}"] == (row[k].startswith(rest) and not (row[k][len(rest):len(rest) + 1].isalnum()
                                                                        or row[k][len(rest):len(rest) + 1] == "_"))
    assert r["right_memory"] == sum(x["right_memory"] for x in r["rows"])
    assert r["only_with_memory"] - r["only_without_memory"] == r["right_memory"] - r["right_no_memory"]
    again = identifier_recall(model, tok, text, context_chars=300, new_tokens=6)
    assert again["rows"] == r["rows"]  # probes are independent: no probe's generation leaks into the next one's memory


def test_a_closed_gate_makes_memory_and_no_memory_agree(model_and_tok):
    model, tok = model_and_tok
    closed = LongMem(model.backbone, model.config).eval()
    closed.sidenet.load_state_dict(model.sidenet.state_dict())
    with torch.no_grad():
        closed.sidenet.gate.fill_(-1e4)  # sigmoid(g) = 0: the memory branch weighs nothing
    r = identifier_recall(closed, tok, code_document(), context_chars=300, new_tokens=6)
    assert r["probes"] > 0
    assert all(row["memory"] == row["no_memory"] for row in r["rows"])
    assert r["only_with_memory"] == r["only_without_memory"] == 0
