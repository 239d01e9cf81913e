"""Running a bundle: `Session(bundle)` opens a streaming session for a bundle of any unit, over the compiled
library, keeping the state on the device between calls. Needs numpy and the TVM runtime only (no torch, no
compiler), so it is what a board runs.

Where it runs: in this process when the bundle is for this machine (or in a child process of its own when
`isolated`, so that its memory is measurable apart from the caller's), or in an aarch64 Python under
qemu-aarch64 (the same bits a board runs, for correctness only) when an ARM CPU bundle is opened on x86_64.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import numpy as np

from edgekit import units
from edgekit.artifact import Bundle, check_runs_here, load
from edgekit.errors import EdgekitError
from edgekit.worker import EMULATED, Worker, receive, send


def Session(bundle: Bundle | Path | str, isolated: bool = False, progress=None, **options):  # noqa: N802
    """A session over the bundle wherever this machine can run it: a frame bundle's session steps frames
    (`step`, `feed`, `run`, `flush`), a segment bundle's scores segments and feeds tokens (`score`, `feed`).
    `options` are the unit's (frame: allow_nonfinite=True lets NaN/Inf frames through, as PyTorch does)."""
    bundle = bundle if isinstance(bundle, Bundle) else load(bundle, check_machine=False)
    unit = units.of(bundle)
    target, here = bundle.target, platform.machine()
    if target["arch"] == "aarch64" and here == "x86_64" and target["runs"] != "cuda":
        from edgekit import emulator

        python = emulator.python_command(emulator.prepare(progress=progress), target.get("emulated_cpu", "max"))
        return unit.remote_session(bundle, Worker(bundle, python, EMULATED, options), **options)
    check_runs_here(bundle)
    if isolated:
        return unit.remote_session(bundle, Worker(bundle, [sys.executable], "native, own process", options), **options)
    return unit.session(bundle, **options)


def serve() -> None:
    """The worker side: one in-process session over the bundle named in argv (checksums verified by the parent
    already), running the methods its class lists in `OPS` as requests arrive on stdin, replying on stdout."""
    bundle = load(Path(sys.argv[-1]), verify=False)  # the library itself is checked again as it is loaded
    session = units.of(bundle).session(bundle, **json.loads(sys.argv[-2]))
    out, inp = sys.stdout.buffer, sys.stdin.buffer
    while True:
        try:
            message = receive(inp)
        except EOFError:
            return
        op = str(message.pop("op"))
        try:
            if op not in ("hello", *session.OPS):
                raise EdgekitError(f"the runtime process has no operation {op!r}")
            reply = (getattr(session, op)(**message) if op != "hello" else None) or {}
        except EdgekitError as e:
            reply = {"error": np.array(str(e))}
        send(out, reply)
