#!/usr/bin/env bash
# The GPU checks in one call of a lent machine, most important first, each under its
# own share of a 9-minute budget; logs and bench JSON under $OUT (at most 8 files).
#   here:  bash .gpu/wheels.sh
#   then:  device run, carry [".gpu/wheels"], timeout_s 600: bash .gpu/run.sh
# What each step settles is in README's Speed section; unmeasured rows say "not yet run
# on a GPU". $BUDGET (seconds, default 540) shortens it.
set -u
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu} && mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ! python3 -c "import whisper, soundfile, jiwer" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .gpu/wheels/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
end=$((SECONDS + ${BUDGET:-540}))
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__)"
    git log --oneline -1 2>/dev/null || echo "(no git)"
} > "$out/machine.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: at most SECONDS, and never past the budget
    local name=$1 limit=$2 left=$((end - SECONDS))
    shift 2
    ((limit > left)) && limit=$left
    ((limit < 10)) && { echo "$name: skipped (budget spent)" >> "$out/machine.txt"; return; }
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "$name: exit $? in $((SECONDS - start)) s (limit $limit)" >> "$out/machine.txt"
}
# 1. the CUDA-only tests: graphs = eager (N = 0 and 1), resume, no host syncs,
#    CastWeights, greedy decoding, the memory estimate against the peak
step pytest_cuda 200 python3 -m pytest -q -k cuda test_whisper_ft.py
# 2. bench for base: rows (a)-(f), issue 17's speed targets ((d) >= 4x (a); its steps
#    >= 2x (c)'s), the default recipe's (f)
step bench_base 300 python3 whisper_ft.py bench --dims base --out runs/gpu_base
cp runs/gpu_base/bench.json "$out/bench_base.json" 2>/dev/null
# 3. NCCL: a 1-process torchrun on bench's corpus and model (random base weights)
step torchrun_nccl 90 python3 -m torch.distributed.run --standalone --nproc-per-node 1 \
    whisper_ft.py train --data runs/gpu_base/corpus --target text --max-steps 20 \
    --model runs/gpu_base/model.pt --out runs/gpu_ddp --eval-every 10 --no-long-form
# 4. large-v3 at its real size (random weights): the memory estimate against the peak
step bench_large 240 python3 whisper_ft.py bench --dims large-v3 --n-utts 128 \
    --epochs 2 --out runs/gpu_large
cp runs/gpu_large/bench.json "$out/bench_large.json" 2>/dev/null
cat "$out/machine.txt"
