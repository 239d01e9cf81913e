"""Remote boards over TVM RPC. `serve` runs TVM's RPC server on a board (runtime-only install) on exactly the port
asked for (TVM's own `Server` scans P..9199 in a child process); `time_calls` uploads a bundle's checked library
from the build machine, loads it in a Relax VM there and times every call there over a carried state: per call,
the input and the previous call's state (left on the board) are set as the VM's inputs, one `invoke_stateful` is
timed by TVM's time evaluator on the board (number=1, repeat=1), and the new state stays there for the next call.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit.artifact import Bundle, check_interface
from edgekit.errors import EdgekitError
from edgekit.units.frame import bench_frames, entry_for, pack

MACHINE, PEAK_RSS = "edgekit.machine", "edgekit.peak_rss_bytes"  # functions the server adds to TVM's registry


def serve(host: str, port: int, ready: Callable[[str], None]) -> None:
    """Serve TVM RPC on host:port until interrupted; `ready` gets "ready on HOST:PORT" once connections are
    accepted. Every session process it forked is stopped on the way out."""
    from edgekit.tvm_runtime import tvm_ffi  # tvm_ffi without torch, before TVM imports it

    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")  # the runtime library only: no compiler on a board
    from tvm.rpc import server

    tvm_ffi.register_global_func(MACHINE, lambda: json.dumps(machine()), override=True)
    tvm_ffi.register_global_func(PEAK_RSS, lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                 override=True)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise EdgekitError(f"cannot listen on {host}:{port}: {e.strerror or e}",
                           "choose another --port, or stop what listens there") from None
    sock.listen(1)
    threading.Thread(target=_accept, args=(server, sock, port), daemon=True).start()
    ready(f"ready on {host}:{port}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds like Ctrl-C, through the cleanup below
    try:
        while True:
            time.sleep(3600)
    finally:
        sock.close()
        for child in multiprocessing.active_children():
            child.kill()
            child.join()


def machine(threads: int | None = None) -> dict:
    """What the numbers ran on: CPU model, cores, frequency governor (where readable), threads and pinning."""
    def read(path: str) -> str | None:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return None

    cpuinfo = read("/proc/cpuinfo") or ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith(("model name", "Model", "Hardware"))), platform.processor() or None)
    arch = platform.machine()
    foreign = "vendor_id" in cpuinfo if arch == "aarch64" else "CPU implementer" in cpuinfo  # qemu-user's /proc
    return {"cpu": model, "arch": arch, "emulated": foreign, "logical_cpus": os.cpu_count(),
            "pinned_to_cpus": sorted(os.sched_getaffinity(0)),
            "governor": read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
            "max_mhz": (int(f) // 1000 if (f := read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq"))
                        else None),
            "tvm_threads": threads or "TVM's default (one per physical core)", "kernel": platform.release(),
            "python": platform.python_version()}


def _accept(server, sock: socket.socket, port: int) -> None:
    """TVM's own accept loop (what tvm.rpc.Server runs in its child process), one session at a time, restarted
    when a session ends badly (a client that went away): TVM's loop stops there."""
    cwd = os.getcwd()
    while True:
        try:
            server._listen_loop(sock, port, "", None, None, None)
        except RuntimeError:
            os.chdir(cwd)  # the failed session's working directory


def time_calls(bundle: Bundle, address: str, chunks: list[int], calls: int, seed: int,
               progress: Callable[[str], None] = lambda msg: None) -> dict[int, dict]:
    """Per chunk size, every call of the bundle's entry timed on the board at `address` (HOST:PORT, an `edgekit
    serve`) over a carried state, with the inputs `edgekit report` streams; the board's machine and peak RSS.
    One session for all (the server serves one at a time)."""
    from edgekit.tvm_runtime import tvm_ffi  # noqa: F401  (tvm_ffi without torch, before TVM imports it)
    import tvm
    from tvm import rpc
    from tvm.runtime.vm import VirtualMachine

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise EdgekitError(f"--rpc {address!r} is not HOST:PORT", "e.g. --rpc 192.168.1.20:9090")
    t0 = time.perf_counter()
    try:
        remote = rpc.connect(host, int(port), session_timeout=0)
    except Exception as e:  # TVM raises RuntimeError or TVMError with the socket's reason
        raise EdgekitError(f"cannot reach an RPC server at {address}: {str(e).splitlines()[0]}",
                           f"start `edgekit serve --port {port}` on the board, and check the address") from None
    with bundle.verified_library() as lib:
        remote.upload(str(lib), "model.so")
    try:
        dev = remote.cpu()
        vm = VirtualMachine(remote.load_module("model.so"), dev)
    except Exception as e:
        raise EdgekitError(f"the board at {address} cannot load {bundle.path}'s library: {str(e).splitlines()[0]}",
                           f"compile the bundle for the board's target (this one is for {bundle.target['name']})"
                           ) from None
    check_interface(bundle, vm["edgekit_interface"]().numpy().tobytes())
    if pool := (bundle.manifest.get("fp_mode") or {}).get("pool_function"):
        vm[pool]()
    init = time.perf_counter() - t0
    timer = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=1)
    runs = {}
    for frames in chunks:
        progress(f"rpc, chunk {frames}: {calls} calls on {address}")
        entry, seconds = entry_for(bundle, frames), []
        state = tvm.runtime.tensor(pack(bundle.zero_state()), dev)
        for x in bench_frames(bundle, frames, calls, np.random.default_rng([seed, frames])):
            vm.set_input(entry, tvm.runtime.tensor(x, dev), state)
            seconds.append(timer(entry).results[0])
            _outputs, state = vm.get_outputs(entry)
        runs[frames] = {"call_seconds": seconds, "init_seconds": init, "rss": [],
                        "peak_rss_bytes": int(remote.get_function(PEAK_RSS)()),
                        "machine": json.loads(remote.get_function(MACHINE)())}
    return runs
