#!/usr/bin/env bash
# GPU check: builds LMUFormer (scv2 config) for the cuda-sm90 target and validates it on this machine's NVIDIA GPU
# against PyTorch, with single-frame steps and 16-frame chunks. For an x86_64 machine with a Hopper GPU
# (H100/H200), after scripts/setup.sh:
#   scripts/gpu_check.sh [BUNDLE_DIR]      (default out/gpu-check-sm90; GPU_CHECK_FRAMES sets the stream length)
# A BUNDLE_DIR that already holds a bundle is validated as it is, so a bundle compiled on a machine with nvcc can
# be checked on one without it. The GPU's driver must support CUDA 13 (>= 580): TVM 0.27's CUDA runtime links
# libcudart.so.13, and the kernels are cubins from a CUDA 13 nvcc. Exits non-zero if any check fails.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=${1:-out/gpu-check-sm90}
frames=${GPU_CHECK_FRAMES:-2000}

echo "== GPU and driver"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader || exit 1
edgekit targets || exit 1

if [ ! -f "$bundle/manifest.json" ]; then
  echo "== compiling lmuformer --config scv2 for cuda-sm90"
  edgekit compile lmuformer --config scv2 --target cuda-sm90 -o "$bundle" || exit 1
fi
echo "== CUDA code in $bundle"
python3 - "$bundle" <<'EOF' || exit 1
import json, sys
from pathlib import Path
from edgekit.cuda import embedded_archs

bundle = Path(sys.argv[1])
manifest = json.loads((bundle / "manifest.json").read_text())
archs = embedded_archs(bundle / manifest["library"])
print(f"target {manifest['target']['name']}, manifest cuda {manifest['cuda']}, embedded images {archs}")
sys.exit(0 if set(archs) == {"sm_90"} else 1)
EOF

status=0
for chunk in 1 16; do
  echo "== validating against PyTorch on the GPU: $frames frames, chunk $chunk"
  edgekit validate "$bundle" --frames "$frames" --chunk "$chunk" || status=1
done
echo "== GPU check: $([ $status -eq 0 ] && echo passed || echo FAILED)"
exit $status
