"""The model zoo: one module per family, registered here by name with its unit, configurations and loader.
A family outside this package (a user's own model) joins with `register`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from edgekit.checkpoint import load_strict, read_state_dict
from edgekit.errors import BundleError, CheckpointError, UnknownNameError
from edgekit.streaming import SegmentModel, StreamingModel

Model = StreamingModel | SegmentModel


@dataclass(frozen=True)
class Family:
    """A model family: its class, the unit it streams in (`edgekit.units`), named configurations (the first is the
    default), and how to read a config off a state dict."""

    name: str
    cls: type[Model]
    unit: str
    configs: dict[str, dict]
    summary: str
    infer_config: Callable[[dict[str, torch.Tensor]], dict]
    check: Callable[[Model], None] = lambda model: None


def _families() -> dict[str, Family]:
    from edgekit.models import aaren, hmt, lmuformer, memlm, slmuformer

    return {f.name: f for f in [
        Family("lmuformer", lmuformer.LMUFormer, "frame", lmuformer.CONFIGS,
               "LMUFormer (public lmu_rnn_conv1d): conv patch embedding + LMU memory; keyword spotting",
               lmuformer.infer_config, lmuformer.check_buffers),
        Family("slmuformer", slmuformer.SLMUFormer, "frame", slmuformer.CONFIGS,
               "Spiking LMUFormer (public slmu_rnn_ms_conv1d): spiking conv embedding + spiking LMU; keyword spotting",
               slmuformer.infer_config, lmuformer.check_buffers),
        Family("aaren", aaren.Aaren, "frame", aaren.CONFIGS,
               "Aaren (attention as an RNN): learned-query softmax attention as a scan; O(1) state per layer",
               aaren.infer_config),
        Family("hmt", hmt.HMT, "segment", hmt.CONFIGS,
               "HMT byte LM: segment recurrence with memory recall over N cached embeddings; segment + decode steps",
               hmt.infer_config),
        Family("memlm", memlm.MemLM, "memory", memlm.CONFIGS,
               "Byte LM over a hierarchical memory bank: anchor Transformer + FFN memories fetched per document",
               memlm.infer_config),
    ]}


FAMILIES = _families()


def register(fam: Family) -> Family:
    """Add a family (or replace one of the same name) for this process: compile, validate and bench then take it
    like the shipped ones."""
    FAMILIES[fam.name] = fam
    return fam


def family(name: str) -> Family:
    if name not in FAMILIES:
        raise UnknownNameError(f"unknown model family {name!r}", f"choose one of: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def build(name: str, config: str | None = None, checkpoint: Path | None = None, seed: int = 0) -> Model:
    """A model in eval mode: from a checkpoint (config read off its shapes), or a named config with seeded
    random weights (same shapes, for trying the toolchain without a trained model)."""
    fam = family(name)
    if checkpoint is not None:
        sd = read_state_dict(checkpoint)
        model = fam.cls(**fam.infer_config(sd))
        load_strict(model, sd, str(checkpoint))
        check_finite(model, str(checkpoint))
        fam.check(model)
        return model.eval()
    config = config or next(iter(fam.configs))
    if config not in fam.configs:
        raise UnknownNameError(f"unknown config {config!r} for {name}", f"choose one of: {', '.join(fam.configs)}")
    torch.manual_seed(seed)
    model = fam.cls(**fam.configs[config]).eval()
    model.init_random(seed)
    return model


def check_finite(model: Model, source: str) -> None:
    """Weights that hold NaN or Inf make every output meaningless: refuse them by name."""
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise CheckpointError(f"{source} holds NaN or Inf weights in {', '.join(bad[:5])}"
                              + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""),
                              "check the training run that wrote it (a diverged loss leaves NaN weights)")


def from_bundle(bundle) -> Model:
    """The PyTorch model a bundle was compiled from, in float64, rebuilt from the weights it carries."""
    m = bundle.manifest["model"]
    try:
        net = family(m["family"]).cls(**m["config"])
    except (TypeError, ValueError) as e:
        raise BundleError(f"{bundle.path}: the manifest's model config does not build a {m['family']} ({e})",
                          "recompile the bundle; do not edit its manifest") from None
    net.load_state_dict(torch.load(bundle.path / m["weights"], map_location="cpu", weights_only=True))
    return net.double().eval()
