#!/usr/bin/env bash
# The pipeline's GPU checks, for a GPU machine (one H100/H200, 16 cores):
#   tests: the `gpu` tests that need no Ray (the flow, the fused stages and the monolith reader
#          on CUDA; the batched decoding is checked on the CPU there too), then, where Ray Serve
#          imports, the `gpu` Serve tests (the app fused and split on CUDA);
#   bench: `gpu_bench` (the ceiling, the models at batch 1/16/64/256, and where Ray Serve
#          imports the HTTP rows: shipped and GPU profiles, both ingress modes, batching off).
# Outputs land in $OUT (or /tmp/pipeline-gpu): tests.txt, serve-tests.txt, bench.txt.
#
#   bash scripts/pipeline_gpu_check.sh tests     # ~3 min (estimates: not run on a GPU yet)
#   bash scripts/pipeline_gpu_check.sh bench     # ~7 min
#   bash scripts/pipeline_gpu_check.sh           # both, stopped at the budget below
#
# The whole run stops within GPU_CHECK_BUDGET_S (570 s unless set), each step getting what is
# left, so a call limited to 600 s still returns what was measured. Both parts together need
# more than that: on a machine lent for 600 s a call, run `tests` and `bench` as two calls
# (the wheels installed by the first are reused while the machine stays warm).
#
# The machine needs the trained pipeline models and the Python packages its image lacks:
# carry `.whl` (from ../shared/device/pack-ray-wheels pydantic-settings skops python-multipart,
# 52 MB) and artifacts/models/pipeline-{detector,scene,digits} (1 MB). All of `artifacts`
# (13 MB, mostly the multiplexing pattern's 1,000 forecasters) with the wheels is over the
# 64 MiB a call may carry. GPU_CHECK_WHEELS names another folder of wheels than .whl.
set -uo pipefail
what="${1:-all}"
case "$what" in tests | bench | all) ;; *) echo "usage: $0 [tests|bench|all]" >&2; exit 2 ;; esac
out="${OUT:-/tmp/pipeline-gpu}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
budget="${GPU_CHECK_BUDGET_S:-570}"
start=$SECONDS
# Seconds for the next step: at most $1, and never past the budget (10 s kept to exit).
allow() {
    local left=$((budget - (SECONDS - start) - 10))
    if [ "$left" -lt "$1" ]; then echo "$left"; else echo "$1"; fi
}
step() {  # step NAME CAP FILE CMD...: runs CMD within its allowance, its output into FILE
    local name=$1 cap=$2 file=$3 s
    shift 3
    s=$(allow "$cap")
    if [ "$s" -lt 30 ]; then
        echo "$name: skipped, the ${budget} s budget is spent" | tee -a "$out/$file"
        return
    fi
    echo "== $name (at most ${s} s)" | tee -a "$out/$file"
    timeout "$s" "$@" 2>&1 | tee -a "$out/$file"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s in all" | tee -a "$out/$file"
}

py="${PYTHON:-}"  # else the project's .venv where there is one (here), else python3 (there)
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
wheels="${GPU_CHECK_WHEELS:-.whl}"  # what the machine's image lacks, as wheels (see above)
if ls "$wheels"/*.whl >/dev/null 2>&1; then
    stamp="/tmp/site/.installed-$(ls "$wheels" | md5sum | cut -c1-12)"
    if [ ! -e "$stamp" ]; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site "$wheels"/*.whl || exit 1
        touch "$stamp"
    fi
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true
serve=no
if "$py" -c "import ray.serve, fastapi, uvicorn" 2>/dev/null; then serve=yes; fi
echo "python: $("$py" --version 2>&1); Ray Serve imports: $serve; budget ${budget} s" | tee "$out/plan.txt"

if [ "$what" != bench ]; then
    step "gpu tests without Ray" 180 tests.txt "$py" -m pytest -q -p no:cacheprovider \
        tests/pipeline/test_flow.py tests/pipeline/test_batching.py
    if [ "$serve" = yes ]; then
        step "gpu Serve tests" 300 serve-tests.txt "$py" -m pytest -q -p no:cacheprovider \
            -m gpu tests/pipeline/test_app.py
    fi
fi
if [ "$what" != tests ]; then
    if [ "$serve" = yes ]; then
        step "gpu_bench" 480 bench.txt "$py" -m patterns.pipeline.bench.gpu_bench
    else
        echo "ray[serve] does not import here: in-process rows only" | tee -a "$out/bench.txt"
        step "gpu_bench, no HTTP" 240 bench.txt "$py" -m patterns.pipeline.bench.gpu_bench \
            --sections ceiling,models
    fi
fi
