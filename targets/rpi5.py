"""Raspberry Pi 5 (BCM2712): four Cortex-A76 cores, which add dot-product and fp16 arithmetic over the A72."""
from edgekit.targets import aarch64

TARGET = aarch64("rpi5", "Raspberry Pi 5 (Cortex-A76), 64-bit OS",
                 {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76", "mattr": ["+neon"]})
