"""Hand-scheduled TVM kernels (TVMScript/TIR), one module per op and target."""
