#!/usr/bin/env bash
# Every check that needs a GPU, in one run of under 6 minutes on one H100/H200:
#   1. tests/test_cuda.py (cuDNN parity, the CUDA sync path against the composed one, no host
#      synchronisation, CUDA-graph capture, at most 16 kernels per synchronised layer step; a
#      fallback from the CUDA sync path fails them), and the CPU-proven CUDA-path tests again
#      on this machine's Triton (AOT compile, the op sequence against reference kernels);
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
    tests/functional/test_cuda_sync.py tests/functional/test_cuda_glue_aot.py \
    2>&1 | tee "$out/tests.log" || status=1
timeout 240 python -m benchmarks --device cuda --cases f --quick --out "$out" \
    2>&1 | tee "$out/bench.log" || status=1
# A fallback from the CUDA sync path (its one warning) must not pass unnoticed.
if grep -q "CUDA sync path's Triton kernels failed" "$out/tests.log" "$out/bench.log"; then
    echo "FAILED: the CUDA sync path fell back to the composed path" >&2
    status=1
fi
exit $status
