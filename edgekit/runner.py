"""The native runner, `edgekit-run`: a C++ program (csrc/runner.cc) that streams a frame or segment bundle through
its compiled entries with TVM's runtime library alone, so a board needs no Python. `add_runner` builds it with the
target's g++ against the TVM runtime and tvm-ffi of the wheels (for aarch64 the aarch64 wheels of the emulation
root) and republishes the bundle with the runner and those two libraries in `runner/`, listed and checksummed in
the manifest like every other file. `NativeWorker` drives it over a pipe as `edgekit.worker.Worker` drives a
Python process: it serves the operations of the unit's session (a memory unit's retrieval from its bank too), so
`session` is the unit's own remote session and validation and reports run through it unchanged: natively, or
under qemu-aarch64 for ARM bundles here."""
from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit import units
from edgekit.artifact import (INTERFACE_KEYS, REPORTS, Bundle, check_runs_here, file_sha256, load, provenance_files,
                              publish, staging_dir)
from edgekit.errors import BundleError, CompileError, EdgekitError
from edgekit.worker import EMULATED, ChildProcess

SOURCE = Path(__file__).with_name("csrc") / "runner.cc"
FOLDER = "runner"
EXECUTABLE = f"{FOLDER}/edgekit-run"
RUNTIME = ("tvm_ffi/lib/libtvm_ffi.so", "tvm/lib/libtvm_runtime.so")  # inside a site-packages holding the wheels
UNITS = ("frame", "segment", "memory")  # what edgekit-run streams
DTYPES = (np.float32, np.int64, np.uint8)  # the pipe's array dtypes, by code
Progress = Callable[[str], None]


def add_runner(path: Path, progress: Progress = lambda msg: None) -> Bundle:
    """Build the native runner for the bundle's target into the bundle (its files checksummed in the manifest);
    the bundle is verified first and republished atomically, its reports kept."""
    bundle = load(path, check_machine=False)
    check_unit(bundle)
    if missing := sorted(rel for rel in provenance_files(bundle.manifest) if not (bundle.path / rel).is_file()):
        raise BundleError(f"{bundle.path} is a device copy ({', '.join(missing[:2])}"
                          f"{' ...' if len(missing) > 2 else ''} "
                          "not here): adding the runner republishes the whole bundle",
                          "add the runner where the bundle was built, then copy its device files again")
    stage = staging_dir(bundle.path)
    try:
        for rel, digest in bundle.manifest["files"].items():
            if not rel.startswith(f"{FOLDER}/"):
                (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(bundle.path / rel, stage / rel)
                if file_sha256(stage / rel) != digest:
                    raise BundleError(f"{bundle.path}: {rel} changed while the runner was being added",
                                      "recompile the bundle; do not edit files inside it")
        for rel in bundle.manifest.get("paged") or {}:  # vouched for node by node by their checksummed tables
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle.path / rel, stage / rel)
        fields = _build(bundle, stage / FOLDER, progress)
        for report in REPORTS:
            if (bundle.path / report).is_file() and not (bundle.path / report).is_symlink():
                shutil.copyfile(bundle.path / report, stage / report)
        manifest = {k: v for k, v in bundle.manifest.items() if k != "files"}
        publish(stage, {**manifest, "runner": fields}, bundle.path, force=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return load(bundle.path, check_machine=False)


def check_unit(bundle: Bundle) -> None:
    """A CPU bundle of a unit the runner streams, or a clear error naming what runs it instead."""
    if bundle.device != "cpu" or bundle.manifest["unit"] not in UNITS:
        raise BundleError(f"{bundle.path} is a {bundle.manifest['unit']} bundle running on {bundle.device}: the "
                          f"native runner streams {' and '.join(UNITS)} bundles on CPUs",
                          "run it with the Python session (edgekit validate / edgekit report --engine python)")


def _build(bundle: Bundle, out: Path, progress: Progress) -> dict:
    """Compile the runner into `out` with the runtime libraries beside it (found through rpath $ORIGIN)."""
    from edgekit import targets

    target = targets.get(bundle.target["name"])
    cxx = target.cc[:-3] + "g++" if target.cc.endswith("gcc") else target.cc
    if shutil.which(cxx) is None:
        raise CompileError(f"the native runner for {target.name} is built with {cxx}, which is not installed",
                           target.install or "install the target's C++ compiler")
    site = _site(bundle, progress)
    out.mkdir(parents=True)
    for lib in RUNTIME:
        shutil.copyfile(site / lib, out / Path(lib).name)
    progress(f"building edgekit-run with {cxx}")
    keys = ",".join(f'"{k}"' for k in INTERFACE_KEYS)  # the manifest fields the library's digest covers
    cmd = [cxx, "-O2", "-std=c++17", f"-DEDGEKIT_INTERFACE_KEYS={keys}", f"-I{site / 'tvm_ffi/include'}",
           str(SOURCE), "-o", str(out / "edgekit-run"), f"-L{out}", "-Wl,--no-as-needed", "-ltvm_ffi", "-ltvm_runtime",
           "-Wl,-rpath,$ORIGIN"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise CompileError(f"building the native runner failed:\n{proc.stderr[-3000:]}",
                           "check the C++ compiler and the apache-tvm-ffi wheel's headers")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return {"executable": EXECUTABLE, "libraries": [f"{FOLDER}/{Path(lib).name}" for lib in RUNTIME],
            "compiler": version, "source_sha256": file_sha256(SOURCE)}


def _site(bundle: Bundle, progress: Progress) -> Path:
    """The site-packages whose TVM runtime and tvm-ffi the runner links: this Python's for this machine's
    bundles, the aarch64 emulation root's for ARM bundles built on x86_64."""
    if _emulated(bundle):
        from edgekit import emulator

        return emulator.site_packages(emulator.prepare(progress=progress))
    check_runs_here(bundle)
    spec = importlib.util.find_spec("tvm_ffi")  # found, not imported: no need to load anything here
    return Path(spec.origin).parent.parent


def _emulated(bundle: Bundle) -> bool:
    return bundle.target["arch"] == "aarch64" and platform.machine() == "x86_64"


def session(bundle: Bundle, allow_nonfinite: bool = False, progress: Progress = lambda msg: None,
            env: dict | None = None):
    """The unit's session over the bundle, served by its native runner: the same interface as `edgekit.Session`
    (frame: step, feed, run, flush; segment: score, feed); `session.worker` is the runner (its call times)."""
    unit = units.of(bundle)
    options = {"allow_nonfinite": allow_nonfinite} if allow_nonfinite else {}
    return unit.remote_session(bundle, NativeWorker(bundle, allow_nonfinite, progress, env), **options)


class NativeWorker(ChildProcess):
    """The bundle's native runner over a pipe (`edgekit-run BUNDLE --serve`), under qemu-aarch64 for an ARM bundle
    on x86_64; `env` is its environment (e.g. TVM_NUM_THREADS). `worker(op, **arrays)` runs the session operation
    `op` there, as `edgekit.worker.Worker` does. `times` holds (entry, items, nanoseconds) of every compiled call,
    timed inside the runner around the compiled function (items: frames, or tokens)."""

    def __init__(self, bundle: Bundle, allow_nonfinite: bool = False, progress: Progress = lambda msg: None,
                 env: dict | None = None):
        check_unit(bundle)
        if "runner" not in bundle.manifest:
            raise BundleError(f"{bundle.path} has no native runner", f"build it in: edgekit runner {bundle.path}")
        self.bundle, prefix = bundle, []
        if _emulated(bundle):
            from edgekit import emulator

            prefix = emulator.command(emulator.prepare(progress=progress), bundle.target.get("emulated_cpu", "max"))
        else:
            check_runs_here(bundle)
        self.execution = "native runner" + (f" under {EMULATED}" if prefix else "")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([*prefix, str(bundle.path / bundle.manifest["runner"]["executable"]),
                                      str(bundle.path), "--serve", *(["--allow-nonfinite"] if allow_nonfinite else [])],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.pid, self.times = self.proc.pid, []
        hello = self._receive()
        self.entries = hello["entries"].tobytes().decode().split("\n")
        self.load_seconds = int(hello["load_ns"][0]) / 1e9
        self.startup_seconds = time.perf_counter() - t0

    def __call__(self, op: str, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        message = [_string(op), len(arrays).to_bytes(4, "little")]
        for name, value in arrays.items():
            value = np.ascontiguousarray(value)
            message += [_string(name), bytes([DTYPES.index(value.dtype.type)]), value.ndim.to_bytes(4, "little"),
                        np.asarray(value.shape, "<i8").tobytes(), value.tobytes()]
        try:
            self.proc.stdin.write(b"".join(message))
            self.proc.stdin.flush()
        except BrokenPipeError:
            self._stopped()
        return self._receive()

    def _receive(self) -> dict[str, np.ndarray]:
        if self._read(1)[0]:
            raise EdgekitError(self._read_string())
        reply = {}
        for _ in range(int.from_bytes(self._read(4), "little")):
            name, code = self._read_string(), self._read(1)[0]
            shape = np.frombuffer(self._read(8 * int.from_bytes(self._read(4), "little")), "<i8")
            dtype = np.dtype(DTYPES[code])
            reply[name] = np.frombuffer(self._read(int(np.prod(shape)) * dtype.itemsize), dtype).reshape(shape)
        self.times += [(self.entries[e], int(items), int(ns)) for e, items, ns in reply.pop("_calls", [])]
        return reply

    def _read_string(self) -> str:
        return self._read(int.from_bytes(self._read(4), "little")).decode(errors="replace")

    def _read(self, n: int) -> bytes:
        data = self.proc.stdout.read(n)
        if len(data) < n:
            self._stopped()
        return data

    def _stopped(self):
        self.proc.wait(timeout=30)
        raise BundleError(f"the native runner for {self.bundle.path} stopped: "
                          f"{self.proc.stderr.read().decode(errors='replace').strip()[-2000:]}",
                          f"rebuild it with `edgekit runner {self.bundle.path}`; check the bundle with `edgekit info`")


def _string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(4, "little") + data
