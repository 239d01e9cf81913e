"""Jetson AGX Orin: Ampere GPU (sm_87) with Cortex-A78AE cores (TVM's tag for the 64 GB module has them)."""
from edgekit.targets import AARCH64_CC, AARCH64_INSTALL, CUDA_INSTALL, Target

TARGET = Target(
    name="jetson-agx-orin",
    summary="Jetson AGX Orin: sm_87 GPU, Cortex-A78AE CPU",
    tvm="nvidia/jetson-agx-orin-64gb",
    arch="aarch64",
    cc=AARCH64_CC,
    runs="cuda",
    needs=("nvcc",),
    install=f"{AARCH64_INSTALL}; {CUDA_INSTALL}",
)
