"""In-context learning: data formats, the two decision rules, and the memory holding only demonstrations."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from longmem import LongMem, LongMemConfig, LongMemError
from longmem.eval.scoring import score_continuations
from longmem.tokens import encode
from longmem.cli import main
from longmem.eval.icl import TASKS, get_task, load_examples, local_context, predict_greedy, predict_likelihood

FIXTURES = Path(__file__).parent / "fixtures"


def test_the_three_formats_read_the_same_kind_of_data():
    sst2 = load_examples(FIXTURES / "sst2_20.tsv", get_task("sst2"))
    mr = load_examples(FIXTURES / "mr_20.csv", get_task("mr"))
    subj = load_examples(FIXTURES / "subj_20.jsonl", get_task("subj"))
    assert len(sst2) == len(mr) == len(subj) == 20
    assert [e.text for e in sst2] == [e.text for e in mr] and [e.label for e in sst2] == [e.label for e in mr]
    assert sum(e.label for e in sst2) == 10
    assert {e.label for e in subj} == {0, 1}
    first = json.loads((FIXTURES / "subj_20.jsonl").read_text().splitlines()[0])
    assert TASKS["subj"].labels[subj[0].label] == first["label"]


def test_templates_follow_the_paper():
    t = get_task("sst2")
    assert t.demonstration("a fine film", 1) == " Review: a fine film Sentiment: positive."
    assert t.prompt("a fine film") == " Review: a fine film Sentiment:"
    assert get_task("subj").prompt("x") == " Input: x Type:"
    assert get_task("sst5").label_continuations() == [" terrible", " bad", " okay", " good", " great"]


@pytest.mark.parametrize("name, content, message", [
    ("a.tsv", "text_a\tlabel\nfine\t1\n", "header must name"),
    ("a.tsv", "sentence\tlabel\nfine\t7\n", "not one of sst2's labels"),
    ("a.csv", "1,fine\nnope\n", "not a 'label,text' line"),
    ("a.jsonl", '{"text": "fine"}\n', "needs 'text' and 'label'"),
    ("a.jsonl", "{oops\n", "not valid JSON"),
    ("a.txt", "fine\n", "unknown format"),
    ("a.csv", "", "holds no examples"),
])
def test_bad_data_is_a_one_line_error(tmp_path, name, content, message):
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(LongMemError, match=message):
        load_examples(f, get_task("sst2"))


def test_unknown_task_and_missing_file():
    with pytest.raises(LongMemError, match="unknown task 'imdb'"):
        get_task("imdb")
    with pytest.raises(LongMemError, match="does not exist"):
        load_examples("no/such.tsv", get_task("sst2"))


def test_decision_rules_on_a_hand_made_example():
    labels = [np.array([5]), np.array([6, 7]), np.array([6])]
    # greedy continuation 6, 7, ...: labels 1 and 2 both match; the longer one wins
    assert predict_greedy(labels, [np.array([False]), np.array([True, True]), np.array([True])]) == 1
    assert predict_greedy(labels, [np.array([False]), np.array([True, False]), np.array([True])]) == 2
    assert predict_greedy(labels, [np.array([False]), np.array([False, True]), np.array([False])]) is None
    assert predict_likelihood([np.array([-1.0]), np.array([-0.2, -0.3]), np.array([-0.6])]) == 1
    assert predict_likelihood([np.array([-0.4]), np.array([-0.2, -0.3]), np.array([-0.6])]) == 0


def test_greedy_rule_matches_real_greedy_generation(checkpoint, tiny_assets):
    model = LongMem.from_pretrained(checkpoint).eval()
    tok = tiny_assets["tokenizer"]
    context = encode(tok, " Review: a fine film Sentiment:")[-8:]
    ids = torch.as_tensor(context).view(1, -1)
    with torch.no_grad():
        for _ in range(3):  # greedy decoding, by hand
            ids = torch.cat([ids, model(ids).logits[0, -1].argmax().view(1, 1)], dim=1)
    g = ids[0, len(context):].numpy()
    other = (g[0] + 1) % 300
    labels = [np.array([other]), g[:2], np.array([g[0], (g[1] + 1) % 300]), g[:1]]
    s = score_continuations(model, "no_memory", context, labels)
    assert predict_greedy(labels, s.greedy) == 1  # starts the greedy output and is the longest such
    assert [bool(np.all(x)) for x in s.greedy] == [False, True, False, True]
    # the likelihood rule on the same scores: the sums of the per-token log-probabilities
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.as_tensor(np.concatenate([context, g[:2]])).view(1, -1)).logits[0], -1)
    assert s.logprobs[1].sum() == pytest.approx((logp[7, g[0]] + logp[8, g[1]]).item(), rel=1e-5)
    assert predict_likelihood(s.logprobs) == int(np.argmax([x.sum() for x in s.logprobs]))


def test_local_context_keeps_the_latest_demonstrations_that_fit():
    demos = [np.arange(4), np.arange(10, 13), np.arange(20, 25)]
    prompt = np.array([99, 98])
    ids, kept = local_context(demos, prompt, 9)
    assert kept == 1 and list(ids) == [20, 21, 22, 23, 24, 99, 98]
    ids, kept = local_context(demos, prompt, 10)
    assert kept == 2 and list(ids) == [10, 11, 12, 20, 21, 22, 23, 24, 99, 98]
    ids, kept = local_context(demos, prompt, 2)
    assert kept == 0 and list(ids) == [99, 98]
    ids, kept = local_context(demos, np.arange(5), 3)
    assert kept == 0 and list(ids) == [2, 3, 4]  # a prompt too long for the window loses its beginning


def test_cli_end_to_end_memory_holds_exactly_the_demonstrations(checkpoint, cli, tiny_assets, tmp_path, capsys):
    data = FIXTURES / "sst2_20.tsv"
    out = tmp_path / "icl.json"
    args = ["icl", "--task", "sst2", "--data", data, "--train", data, "--k", "2", "--memory-demos", "100",
            "--seeds", "2", "--model", checkpoint, "--device", "cpu", "--json", out, "--no-progress"]
    assert cli(*args, "--plot", tmp_path / "icl.png") == 0
    captured = capsys.readouterr()
    assert "fewer than --memory-demos 100" in captured.err  # the pool is used whole
    r = json.loads(out.read_text())
    assert r["memory_demos"] == 20 and r["seeds"] == [1, 2] and r["chance"] == 0.5
    for mode in ("longmem", "no_memory", "backbone"):
        for rule in ("accuracy_greedy", "accuracy_likelihood"):
            a = r[mode][rule]
            assert len(a["per_seed"]) == 2 and a["mean"] == pytest.approx(np.mean(a["per_seed"]))
            assert a["std"] == pytest.approx(np.std(a["per_seed"]))
    # after all 40 test prompts were scored, the memory holds the 20 demonstrations' tokens and nothing else
    task = get_task("sst2")
    demo_tokens = sum(len(encode(tiny_assets["tokenizer"], task.demonstration(e.text, e.label)))
                      for e in load_examples(data, task))
    assert r["longmem"]["memory_tokens"] == [demo_tokens, demo_tokens]
    assert (tmp_path / "icl.png").stat().st_size > 1000
    # deterministic for a seed
    out2 = tmp_path / "icl2.json"
    assert cli(*args[:-3], "--json", out2, "--no-progress") == 0
    r2 = json.loads(out2.read_text())
    assert all(r2[m] == r[m] for m in ("longmem", "no_memory", "backbone"))
    capsys.readouterr()
    assert cli("icl", "--task", "imdb", "--data", data, "--train", data, "--model", checkpoint) == 2
    assert cli("icl", "--task", "sst2", "--data", tmp_path / "none.tsv", "--train", data, "--model", checkpoint) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "unknown task 'imdb'" in err[0] and "does not exist" in err[1]


def test_demonstration_pieces_tokenize_like_the_whole_text(tiny_assets):
    tok = tiny_assets["tokenizer"]
    task = get_task("sst2")
    ex = load_examples(FIXTURES / "sst2_20.tsv", task)[:4]
    pieces = [task.demonstration(e.text, e.label) for e in ex[:3]] + [task.prompt(ex[3].text)]
    whole = encode(tok, "".join(pieces))
    assert np.array_equal(whole, np.concatenate([encode(tok, p) for p in pieces]))
