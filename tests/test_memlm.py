"""memlm: the anchor's fixed-shape steps with a fetched block equal its reference, retrieval runs without torch and
agrees with the model's, and the host bundle's bank is paged: checked node by node, never hashed or held whole."""
from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgekit import Session, models
from edgekit.artifact import is_bundle, load
from edgekit.compile import compile
from edgekit.errors import BundleError, EdgekitError
from edgekit.models.memlm import CONFIGS, MemLM, infer_config
from edgekit.units.memory import BANK, Bank, embed, walk
from edgekit.units.segment import Generator
from edgekit.validate import validate

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sharp(seed: int = 0) -> MemLM:
    """Large random weights in float64, so that the block, the context and the masks all show in the logits."""
    torch.manual_seed(seed)
    model = MemLM(**CONFIGS["tiny"]).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.5)
    return model


def stream(length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bundle(tiny_memory_bundle):
    return tiny_memory_bundle  # built once per test session (conftest)


def test_fixed_steps_with_a_block_equal_the_reference_float64():
    """Scored segments and byte-by-byte generation (segment step, then decode steps) past the context window."""
    model = sharp()
    x = stream(5 * model.L + 3)
    block = model.fetch(model.path(x[0].numpy())).detach()
    with torch.no_grad():
        ref, _ = model.reference_carry(x, (None, block))
        alone, _ = model.reference_carry(x)
    engine = model.numpy_engine()
    engine.fetched = [block]
    gen = Generator(engine)
    fed = np.stack([gen.feed(int(t)) for t in x[0]])
    assert float(np.abs(fed - ref[0].numpy()).max()) < 1e-10
    assert gen.calls["decode"] > 0
    assert float((ref - alone).abs().max()) > 1e-2  # the block matters
    first, second = model.path(x[0].numpy())
    wrong = model.fetch([1 - first, second]).detach()  # another node at level 1
    with torch.no_grad():
        assert float((model.reference_carry(x, (None, wrong))[0] - ref).abs().max()) > 1e-2


def test_retrieval_in_float32_numpy_finds_the_reference_path():
    model = MemLM(**{**CONFIGS["tiny"], "branching": 3, "depth": 3})
    r = {k: v.astype(np.float32) for k, v in model.retriever_arrays().items()}
    docs = [np.random.default_rng(i).integers(0, 256, n) for i, n in enumerate([1, 3, 50, 300, 2000] * 8)]
    found = [walk(embed(d, r["projection"], model.config()["buckets"]), r["centroids"], 3, 3) for d in docs]
    assert found == [model.path(d) for d in docs]
    assert len({tuple(p) for p in found}) > 5  # documents spread over the tree
    assert all(0 <= p[0] < 3 <= p[1] < 12 <= p[2] < 39 for p in found)


def test_checkpoint_round_trip(tmp_path):
    model = sharp().float()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    assert infer_config(model.state_dict()) == model.config()
    back = models.build("memlm", checkpoint=tmp_path / "m.pt")
    assert torch.equal(back.bank, model.bank)


def test_host_bundle_validates_with_the_same_paths(bundle):
    m = bundle.manifest
    assert m["unit"] == "memory" and m["fetched"][0]["name"] == "memory_block"
    assert BANK not in m["files"] and m["paged"][BANK]["table"] in m["files"]  # never hashed whole
    assert is_bundle(bundle.path)  # --force may replace it: the bank is one of its files
    report = validate(bundle.path, documents=6, document_segments=3, decode_segments=2)
    assert report["passed"], report["checks"]
    assert report["path_agreement"] == 1.0 and report["outputs"]["logits"]["max_abs_error"] < 1e-4
    assert report["outputs"]["logits"]["reference_max_abs"] > 0.1


def test_an_int8_bundle_validates_against_its_quantized_reference(tmp_path):
    """Retrieval as in fp32; the logits against the quantized model with the same block, in int8 steps, and its
    kernel check restarted from the artifact's state segment by segment (read back through the worker)."""
    bundle = compile("memlm", "host", tmp_path / "int8", config="tiny", quantize="int8")
    assert bundle.manifest["quantization"]["products"]
    report = validate(bundle.path, documents=3, document_segments=2)
    assert report["passed"], report["checks"]
    assert {"logits_within_2_steps", "logits_codes_differing", "next_byte_agreement", "path_agreement"} <= \
        set(report["checks"]) and report["path_agreement"] == 1.0
    assert report["kernel_check"]["items"] == 6 and "int8 products" in report["reference"]
    effect = report["quantization_effect"]
    assert 0 < effect["outputs"]["logits"]["max_abs_error"] and "bits_per_byte" in effect


def test_a_modified_node_is_refused_when_fetched(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle.path, copy)
    bank = Bank(load(copy))
    doc = np.arange(64) % 7
    node = bank.path(doc)[-1]
    with open(copy / BANK, "r+b") as f:
        f.seek(node * bank.node_bytes + 5)
        f.write(b"\xff")
    bank = Bank(load(copy))  # loads: the bank is checked as it is read
    with pytest.raises(BundleError, match=f"node {node} of {BANK} was modified"):
        bank.fetch(bank.path(doc))
    with open(copy / BANK, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="not .* bytes long"):
        load(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["paged"][BANK]["table"] = "weights.pt.missing"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="without a checksummed table"):
        load(copy)


def test_a_session_fetches_before_scoring_and_keeps_no_mapping(bundle):
    session = Session(bundle)
    L = bundle.manifest["segment"]
    with pytest.raises(EdgekitError, match="fetch"):
        session.score(np.zeros(L, np.int64))
    with pytest.raises(EdgekitError, match=r"must lie in \[0, 256\)"):
        session.fetch(np.array([1, 256]))
    got = session.fetch(np.arange(100) % 256)
    assert got["path"].shape == (bundle.manifest["memory"]["depth"],)
    assert session.score(np.zeros(2 * L, np.int64))["logits"].shape == (1, 2, L, 256)
    with open("/proc/self/maps") as f:
        assert "bank.bin" not in f.read()


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulation is how an x86_64 host runs ARM")
def test_rpi5_bundle_retrieves_and_validates_under_emulation(tmp_path):
    """Retrieval, the bank's memory-mapped reads and their checks run in the aarch64 Python under qemu, and in the
    native runner (built with the aarch64 cross g++) under qemu."""
    from edgekit.runner import add_runner

    bundle = compile("memlm", "rpi5", tmp_path / "memlm-rpi5", config="tiny")
    report = validate(bundle.path, documents=3, document_segments=2)
    assert report["passed"], report["checks"]
    assert report["execution"].startswith("qemu-aarch64") and report["path_agreement"] == 1.0
    native = validate(add_runner(bundle.path).path, documents=3, document_segments=2, runner="native")
    assert native["passed"] and native["execution"].startswith("native runner under qemu-aarch64"), native["checks"]
    assert native["path_agreement"] == 1.0


BOARD = """
import sys
from pathlib import Path
for name in ("torch", "onnx", "onnxruntime"):
    sys.modules[name] = None  # a board's runtime-only install
from edgekit.validate import validate
report = validate(sys.argv[1])
print(report["passed"], report["path_agreement"], "golden record" in report["reference"],
      [m for m in ("tvm.relax", "edgekit.models") if m in sys.modules])
"""


def test_without_torch_retrieval_and_validation_use_the_golden_record(bundle):
    out = subprocess.run([sys.executable, "-c", BOARD, str(bundle.path)], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[0] == "True 1.0 True []", out.stdout + out.stderr


def test_the_shipped_checkpoint_is_the_one_its_record_describes():
    checkpoint = Path(models.__file__).parent / "checkpoints" / "memlm_small.pt"
    model = models.build("memlm", checkpoint=checkpoint)
    record = json.loads(checkpoint.with_suffix(".json").read_text())
    assert record["config"] == model.config() and record["parameters"]["bank"] == model.bank.numel()
    text = b"Permission is hereby granted, free of charge, to any person obtaining a copy"
    assert len(model.path(np.frombuffer(text, np.uint8))) == model.config()["depth"]
