"""Reading PyTorch checkpoints into a model: the one place that knows about wrappers and key prefixes."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from edgekit.errors import CheckpointError


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A tensor state dict from a .pt/.pth file: plain, wrapped in {'state_dict'|'model': ...}, or saved from
    nn.DataParallel / DistributedDataParallel (the `module.` prefix is dropped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist", "pass the path of a .pt/.pth file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a file that is not a checkpoint can make torch warn before it fails
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types here: unpickling, zip, EOF
        first = (str(e).splitlines() or ["(no message)"])[0]
        raise CheckpointError(f"cannot read checkpoint {path} ({path.stat().st_size} bytes): "
                              f"{type(e).__name__}: {first}",
                              "pass a file written by torch.save(model.state_dict(), ...)") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors",
                              "save the model with torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_strict(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    """Load every key and only those keys, with matching shapes; otherwise say exactly what differs."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = [f"missing keys ({len(missing)}): {', '.join(missing)}" if missing else "",
                f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}" if unexpected else "",
                f"wrong shapes ({len(wrong)}): {'; '.join(wrong)}" if wrong else ""]
    problems = [p for p in problems if p]
    if problems:
        raise CheckpointError(f"{source} does not match {type(model).__name__}:\n  " + "\n  ".join(problems),
                              "check the model family and configuration (`edgekit models`)")
    model.load_state_dict(sd)
