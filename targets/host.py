"""The x86_64 development host: native LLVM code for this machine's CPU."""
from edgekit.targets import Target

TARGET = Target(
    name="host",
    summary="this x86_64 machine (LLVM, tuned to its CPU); for development and reference runs",
    tvm={"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "native"},
    arch="x86_64",
)
