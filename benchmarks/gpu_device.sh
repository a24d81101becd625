#!/usr/bin/env bash
# The command for a lent GPU machine (see gpu_wheels.sh, which fills .whl/ here first):
#
#   run(carry=[".whl"], timeout_s=480, command="bash benchmarks/gpu_device.sh")
#
# Installs the carried wheels over the image's torch stack, records the machine (env.txt), then runs
# benchmarks/gpu.py with every part time-boxed: SFT with --use_liger_kernel (Liger's Triton kernels; carried,
# not a project dependency) on LocalEngine and on DeepSpeed's engine, then the whole suite. Everything
# lands in $OUT: env.txt, gpu.json, gpu.md, sft.log, rl.log, gpu_stdout.log, liger/gpu.{json,md},
# liger_deepspeed/gpu.{json,md}.
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
# LIGER_PARTS / DS_PARTS / MAIN_PARTS pick the parts of each run ("" skips that run). First the SFT MFU
# question: Liger with LocalEngine's flat fp32 master weights (the default for one process at ZeRO-0),
# then the same with DeepSpeed's BF16_Optimizer (RLHF_OPS_LOCAL_ENGINE=0), then the whole suite.
LIGER_PARTS=${LIGER_PARTS-sft,profile}
DS_PARTS=${DS_PARTS-sft}
MAIN_PARTS=${MAIN_PARTS-sft,profile,sync,rl}
if [ -n "$LIGER_PARTS" ]; then
  python3 benchmarks/gpu.py --out "$OUT/liger" --parts "$LIGER_PARTS" --part_timeout "${PART_TIMEOUT:-240}" \
    --extra_sft=--use_liger_kernel 2>&1 | tail -n 45
fi
if [ -n "$DS_PARTS" ]; then
  RLHF_OPS_LOCAL_ENGINE=0 python3 benchmarks/gpu.py --out "$OUT/liger_deepspeed" --parts "$DS_PARTS" \
    --part_timeout "${PART_TIMEOUT:-240}" --extra_sft=--use_liger_kernel 2>&1 | tail -n 25
fi
if [ -n "$MAIN_PARTS" ]; then
  python3 benchmarks/gpu.py --out "$OUT" --logs --parts "$MAIN_PARTS" --part_timeout "${PART_TIMEOUT:-240}" "$@" 2>&1 \
    | tee "$OUT/gpu_stdout.log"
fi
