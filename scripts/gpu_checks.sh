#!/usr/bin/env bash
# Every check that needs a GPU, in one run of under 6 minutes on one H100/H200:
#   1. tests/test_cuda.py (cuDNN parity, the fused Triton path against the composed one, no host
#      synchronisation, CUDA-graph capture, at most 16 kernels per synchronised layer step);
#   2. the integration tests that need torchvision and timm (they skip on a CPU-only torch);
#   3. benchmark case f: the synchronised path against torch.nn.SyncBatchNorm's on a 1-rank NCCL
#      group, per layer and per ResNet-50-shaped training step.
# Results go to $OUT (default gpu-results/): the test log, and cuda.json for benchmarks/results/
# (then `python -m benchmarks.report` regenerates the READMEs from it).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
status=0
timeout 170 python -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_cuda.py tests/test_integrations_models.py tests/test_integrations_timm.py \
    2>&1 | tee "$out/tests.log" || status=1
timeout 240 python -m benchmarks --device cuda --cases f --quick --out "$out" \
    2>&1 | tee "$out/bench.log" || status=1
exit $status
