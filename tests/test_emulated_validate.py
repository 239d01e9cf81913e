"""ARM bundles validated on this x86_64 machine by running them under qemu-aarch64 (slow: emulation)."""
import platform

import numpy as np
import pytest
import torch

from edgekit.compile import compile
from edgekit.models import build
from edgekit.runner import add_runner
from edgekit.runtime import Session
from edgekit.units.frame import RemoteSession
from edgekit.validate import validate
from edgekit.worker import EMULATED

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(platform.machine() != "x86_64", reason="emulation is how an x86_64 host runs ARM")]


@pytest.fixture(scope="module")
def arm_bundle(tmp_path_factory):
    return compile("lmuformer", "rpi5", tmp_path_factory.mktemp("arm") / "lmu-rpi5", config="tiny", chunks=(1, 4))


def test_arm_bundle_streams_under_emulation_like_pytorch(arm_bundle):
    session = Session(arm_bundle.path)
    assert isinstance(session, RemoteSession) and session.execution == EMULATED
    x = np.random.default_rng(1).standard_normal((1, 13, 40), dtype=np.float32)
    out = session.run(x, chunk=4)
    with torch.no_grad():
        ref = build("lmuformer", "tiny")(torch.from_numpy(x))
    assert np.abs(out["mean_logits"] - ref["mean_logits"].numpy()).max() < 1e-5
    session.worker.close()


def test_validate_runs_the_arm_bundle_emulated_and_says_so(arm_bundle):
    report = validate(arm_bundle.path, frames=300, chunk=4)
    assert report["passed"], report["checks"]
    assert report["execution"].startswith("qemu-aarch64 emulation") and report["runtime_startup_seconds"] > 0
    assert report["rss_bytes"]["at_T"] is not None


def test_hmt_arm_bundle_validates_under_emulation(tmp_path):
    """The segment-level LM's ARM build: scored past the memory cache wrap and fed byte by byte, under qemu, by an
    aarch64 Python and by the native runner (built with the aarch64 cross g++)."""
    bundle = compile("hmt", "rpi5", tmp_path / "hmt-rpi5", config="tiny")
    report = validate(bundle.path, segments=8, decode_segments=1)
    assert report["passed"], report["checks"]
    assert report["execution"] == EMULATED and report["outputs"]["logits"]["max_abs_error"] < 1e-4
    native = validate(add_runner(bundle.path).path, segments=8, decode_segments=1, runner="native")
    assert native["passed"] and native["execution"] == f"native runner under {EMULATED}", native["checks"]
    assert native["outputs"]["logits"]["max_abs_error"] < 1e-4
