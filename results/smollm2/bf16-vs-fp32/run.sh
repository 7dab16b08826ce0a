# each run starts from a copy of results/smollm2/adapt (state.json, trained.safetensors, metrics.jsonl, cache/) in OUT/fp32 and OUT/bf16
cd "$(dirname "$0")/../../.."; OUT=${OUT:-/tmp/cmp}
export HF_HUB_OFFLINE=1
for p in fp32 bf16; do
  s=$(date +%s)
  .venv/bin/longmem adapt --out $OUT/$p --max-steps 3375 --max-minutes 12 --no-progress --precision $p --lr 3e-4 --fast-lr 3e-3 --accumulate 2 --local-min 16 --local-max 320 --memory-min 256 --memory-max 32768 --text-fraction 0.25 --chat-fraction 0.1 --max-distractors 2 --facts all --haystacks all --eval-every 100 > $OUT/$p.out 2> $OUT/$p.err
  echo "$p $(( $(date +%s) - s )) s" >> $OUT/times.txt
done
