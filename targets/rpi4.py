"""Raspberry Pi 4 (BCM2711): four Cortex-A72 cores, 64-bit OS."""
from edgekit.targets import aarch64

TARGET = aarch64("rpi4", "Raspberry Pi 4 (Cortex-A72), 64-bit OS",
                 {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]})
