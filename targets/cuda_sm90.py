"""An x86_64 machine with a Hopper GPU (H100, H200: sm_90), to validate the CUDA path of a graph on a
workplace GPU before a board runs it."""
from edgekit.targets import CUDA_INSTALL, Target

TARGET = Target(
    name="cuda-sm90",
    summary="x86_64 + Hopper GPU (H100/H200, sm_90): checks CUDA builds off-board",
    tvm={"kind": "cuda", "arch": "sm_90"},
    host={"kind": "llvm", "mtriple": "x86_64-linux-gnu"},
    arch="x86_64",
    runs="cuda",
    aliases=("h100", "h200"),
    needs=("nvcc",),
    install=CUDA_INSTALL,
)
