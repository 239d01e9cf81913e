"""The artifact bundle: a directory holding manifest.json, the built library, the ONNX graphs it came from and
the source weights. Written atomically; read back only after every checksum matches and every path the manifest
names is a plain relative path inside the bundle. The library is loaded from the bytes whose checksum was
checked, and it carries a digest of the interface it was built for, which must match the manifest's."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import platform
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import BundleError

SCHEMA = 2  # 2: paths checked, the library carries its interface digest (`INTERFACE_FUNCTION`)
MANIFEST = "manifest.json"
LIBRARY = "model.so"
REPORTS = ("validation.json", "bench.json", "kv_compare.json", "kv_compare.md", "kv_compare.png")  # edgekit's own
INTERFACE_FUNCTION = "edgekit_interface"  # a library function returning the sha256 of the interface, as uint8
INTERFACE_KEYS = ("unit", "batch", "delay", "horizon", "input", "outputs", "running_means", "state", "entries",
                  "state_packing", "segment", "summary", "decode_cache", "fetched")


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
    """Refuse to overwrite anything unless asked, and never replace what is not provably an edgekit bundle."""
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise BundleError(f"{out} already exists", "pass --force (force=True) to replace it, or choose another -o")
    if not is_bundle(out):
        raise BundleError(f"{out} exists and is not an edgekit bundle (or holds files that are not the bundle's); "
                          "refusing to replace it even with --force", "choose another output path")


def is_bundle(path: Path) -> bool:
    """An empty directory, or one whose manifest is edgekit's and whose every file is one it lists, the manifest
    itself or one of edgekit's own reports: what `--force` may delete without losing anything of the user's."""
    if path.is_symlink() or not path.is_dir():
        return False
    entries = [p for p in path.rglob("*")]
    if not entries:
        return True
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = set(manifest["files"]) | set(manifest.get("paged") or {}) | {MANIFEST, *REPORTS}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if not isinstance(manifest.get("schema"), int) or "target" not in manifest:
        return False
    return all(p.is_dir() and not p.is_symlink() or str(p.relative_to(path)) in listed for p in entries)


STAGES: set[Path] = set()  # this process's staging folders, until they are published


def abandon_stages() -> bool:
    """Remove this process's unpublished staging folders (a signal is ending it mid-build); whether it had any."""
    had = bool(STAGES)
    for stage in STAGES:
        shutil.rmtree(stage, ignore_errors=True)
    STAGES.clear()
    return had


def staging_dir(out: Path) -> Path:
    """A fresh sibling directory to build into, so the final rename is atomic (same filesystem). Staging folders
    of compiles that were killed (their process is gone) are removed on the way."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    stage = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    STAGES.add(stage)
    return stage


def publish(stage: Path, manifest: dict, out: Path, force: bool) -> Path:
    """Checksum every file (but edgekit's own reports, which are not part of the checksums), write the manifest,
    then move the staged bundle into place in one rename."""
    skip = {*REPORTS, *(manifest.get("paged") or {})}  # paged files: their tables are checksummed instead
    files = sorted(p for p in stage.rglob("*") if p.is_file() and str(p.relative_to(stage)) not in skip)
    manifest = {**manifest, "files": {str(p.relative_to(stage)): file_sha256(p) for p in files}}
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    check_destination(out, force)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    stage.rename(out)
    STAGES.discard(stage)
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

    def record(self, name: str, report: dict, path: Path | None = None) -> Path:
        """Save a report (validation, bench) beside the bundle's files, or at `path`: written to a temporary file
        beside it, then renamed over the name, so a symlink there is replaced, never followed. Reports are not
        part of the checksums."""
        return write_atomic(Path(path) if path is not None else self.path / name,
                            (json.dumps(report, indent=2) + "\n").encode())

    def save_report(self, name: str, report: dict, path: Path | None = None) -> dict:
        """`record` a stage's report, noting where it went in the report ("report"), or, when it cannot be written
        (a read-only bundle, a full disk), why not ("report_error"): the results are never lost to that."""
        target = Path(path) if path is not None else self.path / name
        report["report"] = str(target)
        try:
            self.record(name, report, target)
        except OSError as e:
            report["report"] = None
            report["report_error"] = f"could not write {target}: {e.strerror or e}"
        return report

    def interface_digest(self) -> bytes:
        return interface_digest(self.manifest)

    @contextmanager
    def verified_library(self):
        """A private copy of the library made from the bytes whose sha256 is checked here, for the loader: what
        is loaded is what was checked, whatever happens to the bundle's file meanwhile."""
        data = self.library.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.manifest["files"][self.manifest["library"]]:
            raise BundleError(f"{self.path}: {self.manifest['library']} was modified after compilation (sha256 "
                              "mismatch)", "recompile the bundle; do not edit files inside it")
        with tempfile.TemporaryDirectory(prefix="edgekit-lib-") as tmp:
            copy = Path(tmp) / LIBRARY
            copy.write_bytes(data)
            yield copy


def load_library(bundle: Bundle):
    """The bundle's library in TVM's runtime (`tvm_runtime.VM`), loaded from its checked bytes, after its own
    interface digest matched the manifest's."""
    from edgekit.tvm_runtime import load_vm

    with bundle.verified_library() as lib:
        vm = load_vm(lib, bundle.device)
    check_interface(bundle, vm[INTERFACE_FUNCTION]()[0].tobytes())
    if pool := (bundle.manifest.get("fp_mode") or {}).get("pool_function"):
        vm[pool]()  # TVM's pool threads flush denormals too (each kernel does it on the calling thread)
    return vm


def write_atomic(path: Path, data: bytes) -> Path:
    """Write a file by renaming a finished temporary file beside it over its name: readers never see half of it,
    and a symlink at `path` is replaced, never followed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def interface_digest(manifest: dict) -> bytes:
    """sha256 of the manifest fields that describe how the library is called (entries, shapes, delay, unit)."""
    fields = {k: manifest[k] for k in INTERFACE_KEYS if k in manifest}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).digest()


def check_interface(bundle: Bundle, compiled: bytes) -> None:
    """The interface compiled into the library must be the manifest's: an edited delay or shape is refused."""
    if compiled != bundle.interface_digest():
        raise BundleError(f"{bundle.path}: the manifest's interface (unit, entries, shapes, delay) is not the one "
                          "compiled into its library: the manifest was edited", "recompile the bundle")


def load(path: Path, check_machine: bool = True, verify: bool = True) -> Bundle:
    """Open a bundle: the manifest must be edgekit's, every path it names a plain relative path inside the bundle
    and listed with its sha256, every listed file must match it (unless a caller that already checked says not to:
    the library is checked again whenever it is loaded), and (unless told not to) this machine must be able to
    run its target."""
    path = Path(path)
    mf = path / MANIFEST
    if not mf.is_file() or mf.is_symlink():
        raise BundleError(f"{path} is not an edgekit bundle (no {MANIFEST})",
                          "pass a directory made by `edgekit compile`")
    try:
        manifest = json.loads(mf.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{mf} is not valid JSON ({e})",
                          "recompile the bundle; do not edit files inside it") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        schema = manifest.get("schema") if isinstance(manifest, dict) else None
        raise BundleError(f"{path} has manifest schema {schema}, this edgekit reads {SCHEMA}",
                          "recompile the bundle with this edgekit")
    if problem := _malformed(manifest):
        raise BundleError(f"{mf} is malformed: {problem}", "recompile the bundle; do not edit its manifest")
    for rel in _named_paths(manifest):
        _check_inside(path, rel)
        if rel not in manifest["files"]:
            raise BundleError(f"{mf} names {rel} without its checksum", "recompile the bundle")
    for rel, digest in manifest["files"].items():
        _check_inside(path, rel)
        f = path / rel
        if not f.is_file() and rel in provenance_files(manifest):
            continue  # a device copy (`edgekit info --device-files`) leaves what the library was built from behind
        if not f.is_file():
            raise BundleError(f"{path}: file {rel} listed in the manifest is missing", "recompile the bundle")
        if verify and file_sha256(f) != digest:
            raise BundleError(f"{path}: {rel} was modified after compilation (sha256 mismatch)",
                              "recompile the bundle; do not edit files inside it")
    for rel, paged in (manifest.get("paged") or {}).items():
        _check_inside(path, rel)
        if paged["table"] not in manifest["files"]:
            raise BundleError(f"{mf} names the paged file {rel} without a checksummed table", "recompile the bundle")
        f = path / rel
        if not f.is_file() or f.stat().st_size != paged["bytes"]:
            raise BundleError(f"{path}: paged file {rel} is missing or not {paged['bytes']} bytes long",
                              "recompile the bundle; do not edit files inside it")
    bundle = Bundle(path, manifest)
    if check_machine:
        check_runs_here(bundle)
    return bundle


def provenance_files(manifest: dict) -> set[str]:
    """The files a bundle keeps as its build provenance (the ONNX graphs and the source weights): what the library
    was built from and what validation against PyTorch rebuilds the model from, never what a board runs."""
    return {rel for rel in manifest["files"] if rel.startswith("onnx/") or rel == manifest["model"]["weights"]}


def device_files(manifest: dict) -> list[str]:
    """What a board needs to run and check the bundle: the manifest, the library, the golden record and any other
    runtime file (a native runner, a memory bank), as paths relative to the bundle."""
    return [MANIFEST, *sorted(set(manifest["files"]) - provenance_files(manifest)), *(manifest.get("paged") or {})]


TENSOR = {"name": str, "shape": list, "dtype": str}
# Files too large to hash at every load (a memory bank of gigabytes): each is read in pages whose sha256 its table
# lists, checked as each page is read; the table is an ordinary checksummed file, so it vouches for the pages.
PAGED = {str: {"bytes": int, "table": str}}
LAYOUT = {"schema": int, "files": dict, "library": str, "unit": str, "batch": int, "delay": int, "state": [TENSOR],
          "input": TENSOR, "outputs": [TENSOR], "running_means": dict, "entries": {str: {"onnx": str}},
          "model": {"family": str, "config": dict, "weights": str}, "target": {"name": str, "arch": str, "runs": str,
                                                                              "tvm": str}}


def _malformed(manifest: dict) -> str | None:
    """What in the manifest does not have the layout edgekit writes (None: nothing), so that no stage trips
    over a field of the wrong type. Values are checked by the checksums and the library's interface digest."""
    def check(value, layout, where: str) -> str | None:
        if isinstance(layout, type):
            ok = isinstance(value, layout) and not isinstance(value, bool) or layout is bool and isinstance(value, bool)
            return None if ok else f"{where} is not a {layout.__name__}"
        if isinstance(layout, list):
            if not isinstance(value, list):
                return f"{where} is not a list"
            return next((p for i, v in enumerate(value) if (p := check(v, layout[0], f"{where}[{i}]"))), None)
        if not isinstance(value, dict):
            return f"{where} is not an object"
        if str in layout:  # a mapping of names to one layout
            return next((p for k, v in value.items() if (p := check(v, layout[str], f"{where}.{k}"))), None)
        for key, sub in layout.items():
            if key not in value:
                return f"{where + '.' if where else ''}{key} is missing"
            if problem := check(value[key], sub, f"{where + '.' if where else ''}{key}"):
                return problem
        return None

    if problem := check(manifest, LAYOUT, ""):
        return problem
    shapes = [t["shape"] for t in [*manifest["state"], manifest["input"], *manifest["outputs"]]]
    if not all(isinstance(d, int) and d >= 0 for s in shapes for d in s) or manifest["batch"] < 1 \
            or manifest["delay"] < 0:
        return "a shape, the batch or the delay is out of range"
    if manifest.get("golden") is not None and not isinstance(manifest["golden"], dict):
        return "golden is not an object"
    if manifest.get("paged") is not None and (problem := check(manifest["paged"], PAGED, "paged")):
        return problem
    return None


def _named_paths(manifest: dict) -> list[str]:
    """Every file a manifest points at besides its files table: library, weights, golden record, ONNX graphs, the
    native runner and its libraries."""
    try:
        runner = manifest.get("runner")
        return [manifest["library"], manifest["model"]["weights"],
                *([manifest["golden"]["file"]] if manifest.get("golden") else []),
                *[e["onnx"] for e in manifest["entries"].values()],
                *([runner["executable"], *runner["libraries"]] if runner is not None else [])]
    except (KeyError, TypeError, AttributeError):
        raise BundleError("the manifest's library, weights, golden, entries or runner fields are malformed",
                          "recompile the bundle") from None


def _check_inside(bundle: Path, rel) -> None:
    """A plain relative path to a file inside the bundle: no absolute path, no `..`, no symlink on the way."""
    parts = Path(rel).parts if isinstance(rel, str) else ()
    if not parts or Path(rel).is_absolute() or any(p in ("..", ".") for p in parts) or "\\" in rel:
        raise BundleError(f"{bundle}: the manifest names {rel!r}, which is not a plain relative path inside the "
                          "bundle; refusing to read it", "recompile the bundle; never edit its manifest")
    for i in range(1, len(parts) + 1):
        if (bundle / Path(*parts[:i])).is_symlink():
            raise BundleError(f"{bundle}: {Path(*parts[:i])} is a symbolic link; bundle files must be plain files "
                              "inside it", "recompile the bundle")


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
