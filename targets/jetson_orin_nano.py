"""Jetson Orin Nano: Ampere GPU (sm_87) with six Cortex-A78AE cores.

TVM's `nvidia/jetson-orin-nano` tag names Xavier's `carmel` as the host CPU, without dot-product: the host
is set to Orin's actual core here."""
from edgekit.targets import AARCH64_CC, AARCH64_INSTALL, CUDA_INSTALL, Target

TARGET = Target(
    name="jetson-orin-nano",
    summary="Jetson Orin Nano: sm_87 GPU, Cortex-A78AE CPU",
    tvm="nvidia/jetson-orin-nano",
    host={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "mattr": ["+neon"], "num-cores": 6},
    arch="aarch64",
    cc=AARCH64_CC,
    runs="cuda",
    aliases=("jetson",),
    needs=("nvcc",),
    install=f"{AARCH64_INSTALL}; {CUDA_INSTALL}",
)
