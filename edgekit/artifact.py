"""The artifact bundle: a directory holding manifest.json, the built library, the ONNX graphs it came from and
the source weights. Written atomically; read back only after every checksum matches."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import BundleError

SCHEMA = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor crossing the model boundary (batch dimension included)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


def cache_dir() -> Path:
    """Where edgekit keeps what it builds once per machine (bundles of shipped checkpoints, the emulation root):
    $EDGEKIT_CACHE, else ~/.cache/edgekit."""
    return Path(os.environ.get("EDGEKIT_CACHE") or Path.home() / ".cache" / "edgekit")


def file_sha256(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def check_destination(out: Path, force: bool) -> None:
    """Refuse to overwrite anything unless asked, and never replace a directory that is not a bundle."""
    if not out.exists():
        return
    if not force:
        raise BundleError(f"{out} already exists", "pass --force (force=True) to replace it, or choose another -o")
    if not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file()):
        raise BundleError(f"{out} exists and is not an edgekit bundle; refusing to replace it even with --force",
                          "choose another output path")


def staging_dir(out: Path) -> Path:
    """A fresh sibling directory to build into, so the final rename is atomic (same filesystem)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    return stage


def publish(stage: Path, manifest: dict, out: Path, force: bool) -> Path:
    """Checksum every file, write the manifest, then move the staged bundle into place in one rename."""
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    manifest = {**manifest, "files": {str(p.relative_to(stage)): file_sha256(p) for p in files}}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    check_destination(out, force)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old)
    return out


@dataclass
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: dict

    @property
    def library(self) -> Path:
        return self.path / self.manifest["library"]

    @property
    def target(self) -> dict:
        return self.manifest["target"]

    @property
    def device(self) -> str:
        """Where the library's kernels run: "cuda" or "cpu"."""
        return "cuda" if self.target["runs"] == "cuda" else "cpu"

    def zero_state(self) -> list[np.ndarray]:
        """The state at the start of a stream: zeros of every state tensor the manifest lists, in order."""
        return [np.zeros(s["shape"], s["dtype"]) for s in self.manifest["state"]]

    def record(self, name: str, report: dict) -> Path:
        """Save a report (validation, bench) beside the bundle's files; reports are not part of the checksums."""
        path = self.path / name
        path.write_text(json.dumps(report, indent=2) + "\n")
        return path


def load(path: Path, check_machine: bool = True, verify: bool = True) -> Bundle:
    """Open a bundle: the manifest must exist, every listed file must match its sha256 (unless a caller that
    already checked says not to), and (unless told not to) this machine must be able to run its target."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file():
        raise BundleError(f"{path} is not an edgekit bundle (no {MANIFEST})", "pass a directory made by `edgekit compile`")
    manifest = json.loads(mf.read_text())
    if manifest.get("schema") != SCHEMA:
        raise BundleError(f"{path} has manifest schema {manifest.get('schema')}, this edgekit reads {SCHEMA}",
                          "recompile the bundle with this edgekit")
    for rel, digest in manifest["files"].items() if verify else ():
        f = path / rel
        if not f.is_file():
            raise BundleError(f"{path}: file {rel} listed in the manifest is missing", "recompile the bundle")
        if file_sha256(f) != digest:
            raise BundleError(f"{path}: {rel} was modified after compilation (sha256 mismatch)",
                              "recompile the bundle; do not edit files inside it")
    bundle = Bundle(path, manifest)
    if check_machine:
        check_runs_here(bundle)
    return bundle


def check_runs_here(bundle: Bundle) -> None:
    """The bundle's code must match this machine's architecture and, for CUDA bundles, find an NVIDIA driver."""
    t, here = bundle.target, platform.machine()
    if t["arch"] != here:
        raise BundleError(f"{bundle.path} was built for target {t['name']} ({t['arch']}); this machine is {here}",
                          f"run it on a {t['arch']} machine, or compile for this one (--target host)")
    if t["runs"] == "cuda" and not nvidia_driver():
        raise BundleError(f"{bundle.path} was built for target {t['name']}, which runs on an NVIDIA GPU, and this "
                          "machine has no NVIDIA driver (libcuda.so.1)",
                          "run it on the GPU board it was built for; here, validate a host or ARM bundle instead")


def nvidia_driver() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True
