#!/usr/bin/env bash
# The GPU checks in one call of a lent machine, most important first, each under its
# own limit inside a 7-minute budget; logs and bench JSON under $OUT (5 files).
#   here:  bash .gpu/wheels.sh
#   then:  device run, carry [".gpu/wheels"], timeout_s 480: bash .gpu/run.sh
#   again: bash .gpu/run.sh bench_large  (only the steps named; BUDGET=secs to shorten)
# What each settles is in README's Speed section. NCCL is not among them: a machine
# of one GPU runs one rank, and whisper_ft makes no process group for one.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu} && mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import whisper, soundfile, jiwer" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
python3 -c "import whisper_ft" || exit 1
budget=${BUDGET:-420} && end=$((SECONDS + budget))
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__)"
    sha256sum whisper_ft.py test_whisper_ft.py
} >> "$out/machine.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: at most SECONDS, and never past the budget
    local name=$1 limit=$2 left=$((end - SECONDS)) start=$SECONDS
    shift 2
    [[ ${want:-} && " $want " != *" $name "* ]] && return
    ((limit > left)) && limit=$left
    ((limit < 20)) && { echo "$name: skipped (budget spent)" >> "$out/machine.txt"; return; }
    rm -rf "runs/gpu_$name"  # (a warm machine keeps runs/ between calls)
    timeout -k 15 "$limit" "$@" > "$out/$name.log" 2>&1  # (-k: train saves on TERM)
    echo "$name: exit $? in $((SECONDS - start)) s (limit $limit)" >> "$out/machine.txt"
}
want="$*"
# 1. the CUDA-only tests: graphs = eager (N = 0, and N = 1 with SpecAugment), resume,
#    no host syncs, CastWeights (N = 0, 1, LoRA), greedy decoding, the memory estimate
step pytest_cuda 120 python3 -m pytest -q -k cuda test_whisper_ft.py
# 2. bench for base (1,024 utterances, 10 epochs): rows (a)-(f); issue 17's targets,
#    (d) >= 4x (a) end to end and its steps >= 2x (c)'s; the default recipe's (f)
step bench_base 300 python3 whisper_ft.py bench --dims base --out runs/gpu_bench_base
cp runs/gpu_bench_base/bench.json "$out/bench_base.json" 2>/dev/null
# 3. large-v3 at its real size (random weights, few steps): fits, and its estimate
step bench_large 240 python3 whisper_ft.py bench --dims large-v3 --n-utts 64 \
    --epochs 1 --out runs/gpu_bench_large
cp runs/gpu_bench_large/bench.json "$out/bench_large.json" 2>/dev/null
cat "$out/machine.txt"
