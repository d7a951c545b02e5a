#!/usr/bin/env bash
# The pipeline's GPU checks in one run, for a GPU machine (one H100/H200, 16 cores):
#   1. the `gpu` tests that need no Ray (the flow, the fused stages and the monolith reader
#      on CUDA; the batched decoding is checked on the CPU there too),
#   2. `gpu_bench` in-process rows (the ceiling, the models at batch 1/16/64/256),
#   3. where Ray Serve imports: the `gpu` Serve tests (fused and split on CUDA) and the
#      gpu_bench HTTP rows (shipped and GPU profiles, both ingress modes, batching off).
# Outputs land in $OUT (or /tmp/pipeline-gpu): tests.txt, bench.txt, serve-tests.txt.
#
#   bash scripts/pipeline_gpu_check.sh            # ~2 min without Ray, ~9 min with it
#
# The tests run on the CPU and, where CUDA is there, again on the GPU (their `gpu` cases).
#
# The machine needs the trained models (artifacts/models, 23 MB: carry `artifacts`) and the
# Python packages its image lacks, carried as wheels in .whl/ (see patterns/pipeline/README.md,
# "GPU checks"): they are installed into /tmp/site first.
set -uo pipefail
out="${OUT:-/tmp/pipeline-gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
py="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then py=.venv/bin/python; fi
if ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

timeout 240 "$py" -m pytest -q -p no:cacheprovider \
    tests/pipeline/test_flow.py tests/pipeline/test_batching.py 2>&1 | tee "$out/tests.txt"

if "$py" -c "import ray.serve, fastapi, uvicorn" 2>/dev/null; then
    timeout 300 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/pipeline/test_app.py \
        2>&1 | tee "$out/serve-tests.txt"
    timeout 480 "$py" -m patterns.pipeline.gpu_bench 2>&1 | tee "$out/bench.txt"
else
    echo "ray[serve] does not import here: in-process rows only" | tee "$out/bench.txt"
    timeout 240 "$py" -m patterns.pipeline.gpu_bench --sections ceiling,models 2>&1 \
        | tee -a "$out/bench.txt"
fi
