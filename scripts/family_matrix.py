"""Run the eight family checks of tests/test_families.py on every causal-LM family transformers offers.

    python scripts/family_matrix.py [--families a b ...] [--json results/families/matrix-<version>.json] [--readme]

Each family gets a tiny random config from its config class (tests/test_families.py:tiny_config), the
same eight checks as the test suite, and one line: passed, or the first check that failed and why
(a family LongMem refuses fails at construction with its one-line LongMemError). ``--readme`` rewrites
the "Supported model families" table in README.md from the result. Offline, CPU, a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import test_families as tf  # noqa: E402

CHECKS = [tf.test_1_backbone_pass_gives_hf_logits, tf.test_2_stored_keys_values_are_the_pre_rotary_projections,
          tf.test_3_sidenet_blocks_are_unshared_copies_of_odd_backbone_blocks,
          tf.test_4_empty_memory_closed_gate_and_memory_with_content, tf.test_5_incremental_generation_equals_recompute,
          tf.test_6_training_keeps_backbone_bit_identical, tf.test_7_save_load_model_and_memory,
          tf.test_8_batch_rows_are_isolated]
START, END = "<!-- families:start -->", "<!-- families:end -->"


def all_causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


def run_family(model_type: str) -> dict:
    import copy

    from longmem import LongMem

    from transformers import AutoModelForCausalLM

    t0 = time.time()
    try:
        with torch.device("meta"):  # a config class that ignores the tiny sizes would build a real-sized model
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(tf.tiny_config(model_type)).parameters())
        if n > 40_000_000:
            raise RuntimeError(f"the tiny config still has {n / 1e6:.0f}M parameters (its config class ignores the tiny sizes)")
        signal.alarm(120)  # a family that hangs fails instead of stopping the matrix
        hf = tf.make_model(model_type)
        model = LongMem.from_backbone(copy.deepcopy(hf), tf.CFG).eval()
    except Exception as e:  # noqa: BLE001 - the matrix records every way a family can fail
        signal.alarm(0)
        return {"type": model_type, "ok": False, "stage": "build", "error": one_line(e), "s": round(time.time() - t0, 1)}
    for check in CHECKS:
        try:
            if check is tf.test_7_save_load_model_and_memory:
                with tempfile.TemporaryDirectory() as d:
                    check((hf, model), Path(d))
            else:
                check((hf, model))
        except Exception as e:  # noqa: BLE001
            err = one_line(e) if not isinstance(e, AssertionError) else "AssertionError: " + " ".join(str(e).split())[:200]
            return {"type": model_type, "ok": False, "stage": check.__name__.removeprefix("test_"), "error": err,
                    "s": round(time.time() - t0, 1)}
        finally:
            signal.alarm(0) if check is CHECKS[-1] else None
    signal.alarm(0)
    return {"type": model_type, "ok": True, "s": round(time.time() - t0, 1),
            "rotary": model.backbone.rotary, "window": model.backbone.sliding_window}


def reason(row: dict) -> str:
    """A failing family's reason, in a few words (for the README's summary)."""
    e = row["error"]
    for needle, why in (("tiny config still has", "no tiny config from the generic recipe (multimodal wrappers, ignored sizes)"),
                        ("encoder-decoder", "encoder-decoder"), ("not attention in every layer", "state-space / hybrid / linear-attention layers"),
                        ("does not use transformers' attention registry", "no attention-function hook"),
                        ("cannot find the", "encoders and decoders of encoder-decoder families (no causal-LM structure found)"),
                        ("attention sinks", "attention sinks"), ("different widths", "latent attention (MLA)")):
        if needle in e:
            return why
    if row["stage"] == "build" and "LongMemError" not in e:
        return "the generic tiny config does not build (not LongMem)"
    if row["stage"] == "build":
        return "refused by the probe (logits not reproduced; attention called twice, with changing layout or with a mask of its own)"
    return "fails a check"


def readme_table(rows: list[dict], version: str) -> str:
    ok = [r["type"] for r in rows if r["ok"]]
    failed = [r for r in rows if not r["ok"]]
    counts: dict[str, int] = {}
    for r in failed:
        counts[reason(r)] = counts.get(reason(r), 0) + 1
    why = "; ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    lines = [START, "",
             f"Generated by `python scripts/family_matrix.py --readme` (transformers {version}, tiny random configs, "
             f"all eight checks of `tests/test_families.py`): **{len(ok)} of {len(rows)}** causal-LM model types pass.", "",
             "| passing model types |", "|---|", "| " + ", ".join(f"`{t}`" for t in ok) + " |", "",
             f"The other {len(failed)}: {why}. `results/families/matrix-{version}.json` has each one's error line.", "", END]
    return "\n".join(lines)


def main(argv=None) -> int:
    import transformers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", nargs="*", help="model types (default: every causal-LM type in transformers)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--readme", action="store_true", help="rewrite README.md's supported-families table")
    p.add_argument("--shard", help="I/N: run every N-th family from the I-th (0-based), e.g. two processes 0/2 and 1/2")
    p.add_argument("--merge", nargs="+", metavar="JSON", help="no run: merge these result files (e.g. shards)")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = sorted((r for part in parts for r in part["families"]), key=lambda r: r["type"])
        return report(rows, args, parts[0]["transformers"], parts[0]["torch"])
    torch.set_num_threads(1)

    def timeout(signum, frame):
        raise TimeoutError("took more than 120 s")

    signal.signal(signal.SIGALRM, timeout)
    import warnings

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    types = args.families or all_causal_lm_types()
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        types = types[i::n]
    rows = []
    for t in types:
        r = run_family(t)
        rows.append(r)
        print(f"{t:28s} {'PASS' if r['ok'] else 'fail at ' + r['stage'] + ': ' + r['error']}", flush=True)
    return report(rows, args, transformers.__version__, torch.__version__)


def report(rows: list[dict], args, tf_version: str, torch_version: str) -> int:
    passed = sum(r["ok"] for r in rows)
    print(f"\n{passed} of {len(rows)} model types pass (transformers {tf_version}, torch {torch_version})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"transformers": tf_version, "torch": torch_version,
                                               "passed": passed, "total": len(rows), "families": rows}, indent=1) + "\n")
    if args.readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        table = readme_table(rows, tf_version)
        if START in text:
            text = text[:text.index(START)] + table + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n## Supported model families\n\n" + table + "\n"
        readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
