"""Any 64-bit ARM Linux board: baseline ARMv8-A with NEON, no core-specific tuning."""
from edgekit.targets import aarch64

TARGET = aarch64("arm64", "any 64-bit ARM Linux board (ARMv8-A + NEON)",
                 {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, aliases=("arm",))
