#!/usr/bin/env bash
# On the lent GPU machine, in one call (staged here first by benchmarks/gpu_prepare.sh):
# the carried wheels installed, then issue 19's serving measurement and issue 22's evaluate
# case (benchmarks/gpu_serve.py), issue 22's tune measurements on the 135M model beside the
# peers, then on the 1.7B and 7B architectures (benchmarks/gpu_tune.py), each under its own
# time limit (together 565 s, inside the call's 590), each JSON rewritten after every record,
# so that a slow part still leaves what it measured and the others' JSON in $OUT. Serving goes
# first: nothing in the GPU tune path has changed since the 2026-12-04 baseline but the prompt
# tuning autocast fix, while serving has never run on a GPU. Tested on CPU with
# GPU_RUN_SMOKE=1 (a tiny run of each, no wheels, no GPU).
set -uo pipefail
OUT=${OUT:-/tmp/ptune-gpu-out}
mkdir -p "$OUT"
export USE_HUB_KERNELS=NO HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=python3
if [ -z "${GPU_RUN_SMOKE:-}" ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
  serve=(--clients 16 --per-client 8 --max-tokens 64 --alone 32 --generate-batches 16,64,128)
  tune=(--models 135m --peer-models 135m --peer-methods prompt,lora --steps 60)
  big=(--models 1.7b,7b --peer-models none --big-steps 20)
  SERVE_S=${SERVE_S:-170} TUNE_S=${TUNE_S:-220} BIG_S=${BIG_S:-160}
else  # CPU smoke test of this script: the project's environment, tiny runs
  PY=${PY_SMOKE:-.venv/bin/python}
  export PYTHONPATH=$PWD
  serve=(--clients 2 --per-client 1 --max-tokens 4 --alone 1 --generate-batches 1,2)
  tune=(--models tiny --peer-models tiny --methods prompt,lora --peer-methods prompt --steps 2)
  big=(--models tiny --peer-models none --methods prompt --steps 2)
  SERVE_S=${SERVE_S:-300} TUNE_S=${TUNE_S:-600} BIG_S=${BIG_S:-300}
fi
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee "$OUT/versions.txt"
timeout "$SERVE_S" $PY benchmarks/gpu_serve.py .gpu/base "${serve[@]}" --out "$OUT/gpu_serve.json" > "$OUT/gpu_serve.log" 2>&1
echo "gpu_serve: exit $?"; tail -n 30 "$OUT/gpu_serve.log"
timeout "$TUNE_S" $PY benchmarks/gpu_tune.py .gpu/base data/sources/sst2/train.tsv --peers .gpu/peers "${tune[@]}" \
  --out "$OUT/gpu.json" > "$OUT/gpu_tune.log" 2>&1
echo "gpu_tune: exit $?"; tail -n 30 "$OUT/gpu_tune.log"
timeout "$BIG_S" $PY benchmarks/gpu_tune.py .gpu/base data/sources/sst2/train.tsv --peers .gpu/peers "${big[@]}" \
  --out "$OUT/gpu_big.json" > "$OUT/gpu_big.log" 2>&1
echo "gpu_tune (big): exit $?"; tail -n 30 "$OUT/gpu_big.log"
