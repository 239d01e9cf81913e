"""Text generation with a segment-level byte LM (by default the HMT checkpoint shipped with edgekit), byte by
byte in bounded memory: the segment unit's `Generator` over the compiled bundle (or eager PyTorch)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import numpy as np

from edgekit.apps.cache import host_bundle
from edgekit.artifact import load
from edgekit.errors import BundleError, EdgekitError
from edgekit import units
from edgekit.units.segment import Generator, Segment, TVMEngine

# Located without importing edgekit.models (which imports torch): a board only has the runtime.
DEFAULT_CHECKPOINT = Path(importlib.util.find_spec("edgekit.models").origin).parent / "checkpoints" / "hmt_small.pt"


def load_engine(bundle_dir: str | Path) -> TVMEngine:
    """The engine of a segment-level LM's bundle, whatever its unit's kind of segments (checksums verified,
    target runnable here)."""
    bundle = load(bundle_dir)
    unit = units.of(bundle)
    if not isinstance(unit, Segment):
        raise BundleError(f"{bundle.path} holds a {bundle.manifest['model']['family']!r} model that streams "
                          f"{bundle.manifest['unit']}s, not a segment-level LM",
                          "pass a bundle made by `edgekit compile hmt ...`")
    return unit.session(bundle).engine


def open_generator(engine: str = "tvm", bundle: Path | None = None, checkpoint: Path | None = None,
                   config: str | None = None, progress: Callable[[str], None] = lambda m: None
                   ) -> tuple[Generator, int]:
    """A Generator and the model's state bytes: over a given bundle, or the checkpoint (default: the shipped one)
    or named config compiled for this host once (engine "tvm"), or in eager PyTorch (engine "pytorch")."""
    if bundle is None and checkpoint is None and config is None:
        checkpoint = DEFAULT_CHECKPOINT
        if not checkpoint.is_file():
            raise EdgekitError(f"the shipped checkpoint {checkpoint} is missing",
                               "pass --checkpoint PATH or --config small (random weights)")
    if bundle is not None or engine == "tvm":
        eng = load_engine(bundle if bundle is not None else
                          host_bundle("hmt", checkpoint=checkpoint, config=config, progress=progress).path)
        return Generator(eng), eng.bundle.manifest["state_bytes"]
    import torch

    from edgekit import models

    torch.set_num_threads(1)  # per-token ops are tiny: intra-op threads only add synchronisation
    model = models.build("hmt", config, checkpoint)
    return Generator(model.numpy_engine()), model.state_bytes()


def generate(gen: Generator, tokens: int, temperature: float = 0.8, seed: int = 0,
             on_token: Callable[[int], None] = lambda t: None) -> bytes:
    """Continue the stream fed so far (`gen.begin(prompt)`, then `gen.prefill(prompt)`) by `tokens` bytes sampled
    at `temperature` (0: the most likely byte each time); `on_token` sees each as it comes."""
    rng = np.random.default_rng(seed)
    out = bytearray()
    for _ in range(tokens):
        t = gen.sample(temperature, rng)
        out.append(t)
        on_token(t)
        gen.feed(t)
    return bytes(out)
