#!/usr/bin/env bash
# The evaluations of the shipped smollm2-135m-longmem (RESULTS.md, "SmolLM2-135M-Instruct"): every figure there comes from this script.
# Usage: scripts/eval_smollm2.sh [OUT]   (OUT default results/smollm2; needs r-cran-janeaustenr for Emma)
#        MODEL=DIR scripts/eval_smollm2.sh OUT   evaluates another model folder (e.g. one `longmem adapt --export` wrote)
set -euo pipefail
OUT=${1:-results/smollm2}
L=${LONGMEM:-.venv/bin/longmem}
NAME=${MODEL:-smollm2-135m-longmem}
MODEL=(--model "$NAME")
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT" "$OUT/data"
export HF_HUB_OFFLINE=1
t() { local name=$1; shift; local s=$(date +%s); "$@" > "$OUT/$name.txt" 2> "$OUT/$name.err"; echo "$name $(( $(date +%s) - s )) s" | tee -a "$OUT/times.txt"; }
t demo $L demo "${MODEL[@]}" --json "$OUT/demo.json" --no-progress
t facts $L eval facts "${MODEL[@]}" --tokens 16000 --json "$OUT/facts.json" --no-progress
t facts_tiny $L eval facts --model longmem-tiny --tokens 16000 --json "$OUT/facts_tiny.json" --no-progress
t passkey_short $L eval passkey "${MODEL[@]}" --distances 1000 4000 --trials 20 --full-context --json "$OUT/passkey_short.json" --no-progress
t passkey_long $L eval passkey "${MODEL[@]}" --distances 16000 32000 --trials 20 --json "$OUT/passkey_long.json" --no-progress
$PY -c "from longmem.eval.facts import emma_text; open('$OUT/data/emma.txt', 'w').write(emma_text())"
# the demo again on a held-out novel, the kind of text the model was adapted on (the default demo reads code)
t demo_emma $L demo "${MODEL[@]}" --data "$OUT/data/emma.txt" --json "$OUT/demo_emma.json" --no-progress
t ppl_emma $L eval ppl "${MODEL[@]}" --data "$OUT/data/emma.txt" --max-tokens 16384 --json "$OUT/ppl_emma.json" --no-progress
[ -f "$OUT/data/corp/code/test.jsonl" ] || $L data code --out "$OUT/data/corp" > /dev/null
t ppl_code $L eval ppl "${MODEL[@]}" --data "$OUT/data/corp/code/test.jsonl" --max-tokens 4096 --json "$OUT/ppl_code.json" --no-progress
# RULER through the harness (pip install 'longmem[ruler]'; its data are generated offline): a needle in a haystack,
# the second of several keys, and variable tracking; one run per length, since --limit takes the first examples
# of each task and they are all of the first length
for n in 4096 16384; do
  t ruler_$n $L eval harness --tasks niah_single_1 niah_multikey_2 ruler_vt --model-args "pretrained=$NAME" --memory on off --limit 10 \
      --metadata "{\"max_seq_lengths\": [$n]}" --output "$OUT/ruler_$n.json" --no-progress
done
rm -rf "$OUT/data"
