"""The one helper apps use to get a runnable bundle of a shipped checkpoint: compiled for this host on first use
and cached for next time, keyed by the checkpoint's sha256 (or the named config), the options and edgekit's
version."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

from edgekit import __version__
from edgekit.artifact import Bundle, cache_dir, file_sha256, load
from edgekit.errors import BundleError


def host_bundle(family: str, *, checkpoint: Path | None = None, config: str | None = None,
                progress: Callable[[str], None] = lambda m: None, **options) -> Bundle:
    """The bundle of `checkpoint` (or of `config` with seeded weights) for this host, compiled once into
    <cache>/bundles/. Compiling needs torch and TVM's compiler; a cached bundle needs neither."""
    key = file_sha256(checkpoint)[:16] if checkpoint is not None else f"cfg-{config}"
    if options:
        key += "-" + hashlib.sha256(json.dumps(options, sort_keys=True, default=list).encode()).hexdigest()[:8]
    out = cache_dir() / "bundles" / f"{family}-{key}-host-{__version__}"
    if out.is_dir():
        try:
            return load(out)
        except BundleError as e:  # corrupted, or from an older edgekit: ours to rebuild, not the user's to fix
            progress(f"the cached bundle {out} is unusable ({str(e).splitlines()[0]}): rebuilding it")
            shutil.rmtree(out)
    if not out.is_dir():
        from edgekit.compile import compile

        progress(f"first use: compiling {family} for this host into {out} (cached for next time)")
        try:
            compile(family, "host", out, config=config, checkpoint=checkpoint, progress=progress, **options)
        except BundleError:
            if not out.is_dir():  # not a concurrent compile that got there first
                raise
    return load(out)
