#!/usr/bin/env bash
# The GPU checks of issue 11 in one script: CUDA parity tests of the fused scan, then the throughput/MFU
# table for README. Two steps, because the GPU machine reaches no package index:
#
#   bash bench/gpu_check.sh fetch     # here, with pip: wheels the GPU machine lacks -> .whl/ (git-ignored)
#   bash bench/gpu_check.sh           # there, from the repository root, with .whl/ carried along
#
# The device tool call: run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=560).
# FULL=1 adds the rest of the table (tiny at 256 / 1024, eager rows, scan timings): another ~6 min.
# Results are printed and also written under $OUT (default /tmp/mmrec-gpu-check/).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [[ "${1:-}" == "fetch" ]]; then
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    # The GPU image (python 3.12, torch, triton, einops, numpy, pyyaml, tqdm, pytest) lacks these:
    $PY -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl fla-core==0.5.2 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 \
        typing-inspection==0.4.2 typing-extensions==4.16.0
    exit $?
fi

OUT=${OUT:-/tmp/mmrec-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    $PY -m pip install -q -r requirements-gpu.txt || exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import torch, triton, fla, fla.ops.hgrn, mmrec.model.scan as s; print('torch', torch.__version__, 'triton', triton.__version__,
'fla', fla.__version__, 'fused scan available:', s.FLA_AVAILABLE); assert s.FLA_AVAILABLE, 'fla does not load'" \
    2>&1 | tee -a "$OUT/device.txt"
[[ ${PIPESTATUS[0]} == 0 ]] || { echo "error: the fused scan cannot run here; nothing measured"; exit 1; }

echo "== CUDA parity: fla's fused scan against the float64 sequential scan (outputs and gradients)"
$PY -m pytest -q -p no:cacheprovider tests/model/test_scan.py tests/model/test_lm.py -k "cuda" -rs 2>&1 | tee "$OUT/parity.txt"
parity=${PIPESTATUS[0]}
grep -q "skipped" "$OUT/parity.txt" && { echo "error: CUDA parity tests were skipped"; parity=1; }

bench() {  # one table: bench_throughput.py's own output, kept whole
    echo "== bench_throughput.py $* (at ${SECONDS}s)"
    $PY bench/bench_throughput.py --device cuda --tokens 65536 --warmup 2 --steps 8 --stat median \
        --json "$OUT/bench.jsonl" "$@" 2>&1 | tee -a "$OUT/bench.txt"
}
# The issue's targets first: tiny at 4096 (fused vs our compiled scan vs GPT), then the 28M shape.
bench --compile --seqs 4096 --no-scan-times
bench --compile --width 512 --layers 8 --seqs 1024 4096 --variants mmrec gpt --no-scan-times
if [[ "${FULL:-0}" == 1 ]]; then
    bench --compile --seqs 256 1024
    bench --seqs 256 1024 4096 --no-scan-times
    bench --compile --width 512 --layers 8 --seqs 1024 4096 --variants mmrec:torch --no-scan-times
fi
echo "parity tests exit code: $parity; ${SECONDS}s in all"
exit $parity
