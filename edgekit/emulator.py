"""Runs aarch64 artifacts on an x86 host under qemu-aarch64 user-mode emulation.

A cached root holds an arm64 Debian Python 3.11 with the aarch64 wheels of numpy, tvm-ffi and TVM minus
its compiler: the same bits a Cortex-A board would run, started in about 1.5 s per process through
edgekit/tvm_runtime.py (a full `import tvm` would load the compiler: 5-10 s). Built once by `prepare`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from edgekit import artifact
from edgekit.errors import EdgekitError

# What `python3.11-minimal` links (libc6, libexpat1, zlib1g) and what the runtime path loads: ctypes (libffi8),
# numpy, tvm-ffi and libtvm_runtime (libstdc++6, libgcc-s1). libssl3, libbz2, liblzma, libuuid and libcrypt
# serve stdlib modules the runtime never imports (hashlib falls back to its built-in digests).
DEBS = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib",
    "libc6", "libexpat1", "zlib1g", "libffi8", "libstdc++6", "libgcc-s1",
)
# Explicit pins for what edgekit's host build targets; pip resolves the rest (ml_dtypes, typing_extensions).
WHEELS = ("numpy", "apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.15.post2")
# The compiler library (240 MB) and kernel-library headers are never used at run time; without the compiler
# `import tvm` still works there, in TVM's runtime-only mode.
_SKIP_IN_WHEELS = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty/")
_PYTHON = "usr/bin/python3.11"
_SITE = "usr/lib/python3/dist-packages"  # on Debian's sys.path: no PYTHONPATH needed
_MARKER = "edgekit-root.json"
_SPEC = {"debs": list(DEBS), "wheels": list(WHEELS)}
_RUNNER = Path(__file__).with_name("tvm_runtime.py")

Progress = Callable[[str], None]


def prepare(cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """Returns the emulation root `<cache_dir>/aarch64-root`, building it first if it is missing or was
    built from other package lists. It is built in a temporary folder and renamed into place, so an
    interrupted set-up leaves nothing half-done; processes that need it at once (parallel test workers) wait
    for the one building it. Needs apt (Debian 12 arm64 packages), pip and network."""
    say = progress or (lambda _msg: None)
    cache = Path(cache_dir) if cache_dir else artifact.cache_dir()
    root = cache / "aarch64-root"
    if _ready(root):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".aarch64-root.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _ready(root):  # else another process built it while this one waited
            _build(root, say)
    say(f"aarch64 root ready: {root}")
    return root


def _build(root: Path, say: Progress) -> None:
    """Downloads, unpacks and precompiles the root in a temporary folder beside `root`, then renames it there."""
    _qemu()
    for tool, package in (("dpkg", "dpkg"), ("apt-get", "apt")):
        if not shutil.which(tool):
            raise EdgekitError(f"{tool} not found: the aarch64 root is built from Debian arm64 packages",
                               f"run on Debian 12 or install {package}")
    _run([sys.executable, "-m", "pip", "--version"], "pip is not available for this Python",
         "apt-get install python3-pip, or python -m ensurepip")
    _enable_arm64(DEBS, say)

    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".aarch64-root-") as tmp:
        work = Path(tmp)
        new, debs, wheels = work / "root", work / "debs", work / "wheels"
        for d in (new, debs, wheels):
            d.mkdir()
        say(f"downloading {len(DEBS)} arm64 Debian packages")
        _run(["apt-get", "download", *(f"{p}:arm64" for p in DEBS)], "apt-get download failed", cwd=debs)
        say("downloading aarch64 wheels: " + ", ".join(WHEELS))
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
              "--platform", "manylinux_2_28_aarch64", "--python-version", "3.11", "--implementation", "cp",
              "--dest", str(wheels), *WHEELS], "pip download of the aarch64 wheels failed",
             "check access to PyPI (pip config list shows the index in use)")
        say("unpacking")
        installed = {}
        for deb in sorted(debs.glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(new)], f"dpkg -x {deb.name} failed")
            name, version, _arch = deb.stem.split("_")
            installed[name] = unquote(version)
        for whl in sorted(wheels.glob("*.whl")):
            with zipfile.ZipFile(whl) as z:
                z.extractall(new / _SITE, [m for m in z.namelist() if not m.startswith(_SKIP_IN_WHEELS)])
            name, version = whl.name.split("-")[:2]
            installed[name] = version
        # Emulated Python compiles slowly; precompiled bytecode cuts each start from ~4 s to ~1.5 s.
        say("precompiling Python bytecode under qemu (about 20 s)")
        _run([*python_command(new), "-m", "compileall", "-q", "-j0", str(new / "usr/lib/python3.11"),
              str(new / _SITE)], "the emulated Python does not run")
        (new / _MARKER).write_text(json.dumps({"spec": _SPEC, "installed": installed}, indent=1))
        if root.exists():  # built from other package lists
            root.rename(work / "stale")
        new.rename(root)


def command(root: Path, cpu: str = "max") -> list[str]:
    """argv prefix that runs an aarch64 program against the root's libraries (its loader, libc, libstdc++) on an
    emulated `cpu` (a board's core, so that an instruction it lacks stops the program as it would on the board)."""
    return [_qemu(), "-cpu", cpu, "-L", str(root)]


def python_command(root: Path, cpu: str = "max") -> list[str]:
    """argv prefix that runs the root's aarch64 Python. -E -s keep the host's PYTHON* variables and user
    site out of it; the wheels sit in its own dist-packages, so scripts run by path need nothing else."""
    return [*command(root, cpu), str(root / _PYTHON), "-E", "-s"]


def site_packages(root: Path) -> Path:
    """Where the root's aarch64 wheels are unpacked (tvm_ffi/, tvm/lib/: what a native runner links)."""
    return root / _SITE


def run(lib_path: str | os.PathLike, inputs: Sequence[np.ndarray], function: str = "main",
        root: Path | None = None, timeout: float = 600) -> list[np.ndarray]:
    """One call of `function` of an aarch64 Relax library under emulation, in a fresh process (~1.5 s
    each): for long streams, loop inside one emulated process instead."""
    root = root or prepare()
    with tempfile.TemporaryDirectory(prefix="edgekit-emu-") as tmp:
        args, outs = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(args, *inputs)
        _run([*python_command(root), str(_RUNNER), str(Path(lib_path).resolve()), str(args), str(outs), function],
             f"emulated run of {lib_path} failed", "check that it was built for aarch64-linux-gnu",
             timeout=timeout)
        with np.load(outs) as f:
            return [f[f"arr_{i}"] for i in range(len(f.files))]


def _ready(root: Path) -> bool:
    try:
        return json.loads((root / _MARKER).read_text())["spec"] == _SPEC
    except (OSError, ValueError, KeyError):
        return False


def _qemu() -> str:
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    if not qemu:
        raise EdgekitError("qemu-aarch64 not found: aarch64 artifacts run under user-mode emulation",
                           "apt-get install qemu-user")
    return qemu


def _enable_arm64(packages: Sequence[str], say: Progress) -> None:
    """Adds the arm64 architecture and refreshes apt's lists only when the packages are not known yet."""
    arches = subprocess.run(["dpkg", "--print-foreign-architectures"], capture_output=True, text=True).stdout
    known = "arm64" in arches.split() and subprocess.run(
        ["apt-get", "download", "--print-uris", *(f"{p}:arm64" for p in packages)],
        capture_output=True).returncode == 0
    if known:
        return
    if os.geteuid() != 0:
        raise EdgekitError("apt does not know the arm64 packages the aarch64 root is built from",
                           "run once as root: dpkg --add-architecture arm64 && apt-get update")
    if "arm64" not in arches.split():
        say("adding the arm64 architecture to dpkg")
        _run(["dpkg", "--add-architecture", "arm64"], "dpkg --add-architecture arm64 failed")
    say("apt-get update")
    _run(["apt-get", "update"], "apt-get update failed")
    _run(["apt-get", "download", "--print-uris", *(f"{p}:arm64" for p in packages)],
         "apt has no arm64 candidates for the aarch64 root's packages",
         "they come from Debian 12 (bookworm); on Ubuntu, arm64 packages need a ports.ubuntu.com source")


def _run(cmd: list[str], what: str, hint: str = "", cwd: Path | None = None,
         timeout: float | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EdgekitError(f"{what}: timed out after {timeout} s", hint) from None
    if proc.returncode:
        raise EdgekitError(f"{what}:\n{(proc.stderr or proc.stdout)[-3000:].rstrip()}", hint)
