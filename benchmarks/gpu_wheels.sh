#!/usr/bin/env bash
# The wheels benchmarks/gpu.py needs on a lent GPU machine (nvidia-h100-x1 / nvidia-h200) that its
# image lacks or holds in another version than the one tested here. That image has Python 3.12,
# torch (CUDA) and most of the stack, and no network. This script, run HERE (registry reachable),
# fills .whl/ (git-ignored via .git/info/exclude), about 20 MB; the device call then carries it:
#
#   run(carry=[".whl"], timeout_s=480, command="bash benchmarks/gpu_device.sh")
#
# Versions are this project's tested ones (.venv), except huggingface_hub: the image's 1.33 satisfies
# transformers (>=1.31), and 2.x would need httpx2, which the image lacks. typing_extensions, regex and fsspec
# are in the image in versions not read here: carried so that pydantic, transformers and datasets get
# the versions they were tested with. pyarrow (datasets wants >=24) is not: its 55 MB wheel would put
# the call over its 64 MiB, so the image's is used (gpu_device.sh records its version). deepspeed has no wheel on PyPI: it is built here
# as pure Python (its ops compile on first use, and gpu.py uses none of them).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
py=.venv/bin/python
ver() { "$py" -c "import importlib.metadata as m; print(m.version('$1'))"; }
pkgs=()
for p in transformers datasets dill multiprocess hjson pydantic pydantic_core annotated-types typing-inspection \
    typing_extensions regex fsspec; do
  pkgs+=("$p==$(ver "$p")")
done
pkgs+=("liger-kernel==0.8.5")  # not a project dependency (GPU-only, Triton): gpu_device.sh's --use_liger_kernel run
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${pkgs[@]}"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(ver deepspeed)"
ls -la .whl
du -sh .whl
