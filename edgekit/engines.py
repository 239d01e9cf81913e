"""What every engine that a benchmark compares with the compiled bundle shares: one thread count for all of
them, and ONNX Runtime sessions over the bundle's own ONNX entries (the graphs TVM compiled)."""
from __future__ import annotations

import os
from contextlib import contextmanager

from edgekit.artifact import Bundle


def use_threads(threads: int | None) -> dict:
    """One thread count for every engine (None: each engine's own default: TVM counts physical cores, ONNX
    Runtime and PyTorch their own way). TVM reads TVM_NUM_THREADS when its thread pool starts, so this must run
    before the first TVM call of the process. Returns the counts in effect, for the report."""
    counts: dict = {"requested": threads}
    try:
        import torch

        if threads is not None:
            torch.set_num_threads(threads)
        counts["pytorch"] = torch.get_num_threads()
    except ImportError:
        pass
    if threads is not None:
        os.environ["TVM_NUM_THREADS"] = str(threads)
    from edgekit.tvm_runtime import num_threads

    counts["tvm"] = num_threads()
    counts["onnxruntime"] = threads if threads is not None else "its default (one per physical core)"
    return counts


@contextmanager
def torch_flushes_denormals():
    """PyTorch flushes denormals while the engines are timed, as the compiled library and ONNX Runtime (its
    session option) do: a fair comparison on long streams. Restored afterwards."""
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def ort_options(threads: int | None):
    """ONNX Runtime session options running each graph on `threads` threads (None: its default)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.set_denormal_as_zero", "1")  # as the compiled library flushes them
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return opts


def ort_session(bundle: Bundle, entry: str, threads: int | None):
    """An ONNX Runtime CPU session over one entry point's ONNX graph in the bundle."""
    import onnxruntime as ort

    return ort.InferenceSession(str(bundle.path / bundle.manifest["entries"][entry]["onnx"]), ort_options(threads),
                                providers=["CPUExecutionProvider"])
