#!/usr/bin/env bash
# Run the family test matrix (tests/test_families.py, plus the backbone/model/generation tests) under given
# transformers versions, each in a throwaway venv under /tmp (torch pinned as in pyproject.toml).
#
#   scripts/compat_matrix.sh 5.0.0 5.24.0      # the oldest 5.x on pip and the newest
#
# Prints one line per version: passed/failed counts. The supported range in pyproject.toml is what passed.
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$root/results/families"
for v in "$@"; do
  venv="/tmp/longmem-tf-$v"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv" && "$venv/bin/pip" install -q torch==2.13.0 &&
      "$venv/bin/pip" install -q "transformers==$v" faiss-cpu safetensors numpy tqdm matplotlib rdata tokenizers pytest &&
      "$venv/bin/pip" install -q --no-deps -e "$root" || { echo "transformers $v: install failed"; continue; }
  fi
  log="$root/results/families/compat-transformers-$v.txt"
  (cd "$root" && HF_HUB_OFFLINE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
      tests/test_families.py tests/test_backbone.py tests/test_model.py tests/test_generation.py tests/test_baselines.py) > "$log" 2>&1
  echo "transformers $v: $(tail -1 "$log")"
done
