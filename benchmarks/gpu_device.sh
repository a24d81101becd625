#!/usr/bin/env bash
# The command for a lent GPU machine (see gpu_wheels.sh, which fills .whl/ here first):
#
#   run(carry=[".whl"], timeout_s=480, command="bash benchmarks/gpu_device.sh")
#
# Installs the carried wheels over the image's torch stack, records the machine (env.txt), then runs
# benchmarks/gpu.py with every part time-boxed, then its SFT part again with --use_liger_kernel (Liger's
# Triton kernels; carried, not a project dependency). Everything lands in $OUT (at most 8 files come
# back: env.txt, gpu.json, gpu.md, sft.log, rl.log, gpu_stdout.log, liger/gpu.json, liger/gpu.md).
set -uo pipefail
OUT=${OUT:?set OUT to the results folder}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
{
  date -u; nvidia-smi; nproc; free -g
  python3 -c "import importlib.metadata as m
for p in ('torch', 'triton', 'liger_kernel', 'transformers', 'tokenizers', 'deepspeed', 'datasets', 'pyarrow', 'fsspec', 'huggingface_hub', 'safetensors', 'accelerate', 'peft'):
    try: print(p, m.version(p))
    except Exception as e: print(p, 'MISSING', e)
import torch, transformers, deepspeed, datasets; print('imports ok; cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# MAIN_PARTS / LIGER_PARTS pick the parts of each run ("" skips that run)
MAIN_PARTS=${MAIN_PARTS-sft,profile,sync,rl}
LIGER_PARTS=${LIGER_PARTS-sft,profile}
if [ -n "$MAIN_PARTS" ]; then
  python3 benchmarks/gpu.py --out "$OUT" --logs --parts "$MAIN_PARTS" --part_timeout "${PART_TIMEOUT:-240}" "$@" 2>&1 \
    | tee "$OUT/gpu_stdout.log"
fi
if [ -n "$LIGER_PARTS" ]; then
  python3 benchmarks/gpu.py --out "$OUT/liger" --parts "$LIGER_PARTS" --part_timeout "${PART_TIMEOUT:-240}" \
    --extra_sft=--use_liger_kernel 2>&1 | tail -n 45
fi
