"""int8 artifacts: the kernels against numpy on every instruction set this machine can run, the quantized model
against its reference, the manifest's account, the ARM builds' instructions, and refusals."""
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch
import tvm

from edgekit import models, quantize, targets
from edgekit.compile import compile
from edgekit.errors import CompileError
from edgekit.kernels import cpu_int8
from edgekit.validate import validate


def _reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """edgekit.quantize's product in numpy: per-row codes, per-channel weight codes, exact int64 sums."""
    codes, sw = quantize.weight_codes(w)
    sx = np.abs(x).max(-1, keepdims=True) / np.float32(127)
    q = np.clip(np.round(x / np.maximum(sx, np.float32(quantize.TINY))), -127, 127).astype(np.int64)
    return (q @ codes.astype(np.int64)).astype(np.float32) * sw * sx


def _run(func, *args) -> np.ndarray:
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target=targets.get("host").tvm_target())
    out = tvm.runtime.tensor(np.zeros(args[-1], np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in args[:-1]], out)
    return out.numpy()


def _kernel(kind: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    (m, k), n = x.shape, w.shape[0]
    codes, sw = quantize.weight_codes(w)
    if kind == "generic":
        return _run(cpu_int8.generic_kernel(m, k, n), x, np.ascontiguousarray(codes.T), sw, (m, n))
    return _run(cpu_int8.dot_kernel(kind, m, k, n), x, cpu_int8.pack(codes, cpu_int8.LANES[kind]),
                cpu_int8.start_offsets(kind, codes), sw, (m, n))


def _host_has(*features: str) -> bool:
    return all(tvm.target.codegen.target_has_features(f, targets.get("host").tvm_target()) for f in features)


HOST_KINDS = ["generic"] + [kind for kind, feature in [("avx2", "avx2"), ("avx512-bw", "avx512bw"),
                                                       ("avx512-vnni", "avx512vnni")] if _host_has(feature)]


@pytest.mark.parametrize("kind", HOST_KINDS)
@pytest.mark.parametrize("m,k,n", [(1, 120, 32), (16, 37, 48), (1, 64, 256)])  # K tails, row tiles, N not a
# multiple of 16, panels stored in groups of 4
def test_int8_kernels_equal_the_scheme_exactly_and_propagate_nan(kind, m, k, n):
    rng = np.random.default_rng(m * k + n)
    x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
    x[m - 1] = 0  # a row of zeros quantizes to zeros, not NaN
    np.testing.assert_array_equal(_kernel(kind, x, w), _reference(x, w))
    x[0, k // 2] = np.nan
    y = _kernel(kind, x, w)
    assert np.isnan(y[0]).all() and not np.isnan(y[1:]).any()


def test_quantized_products_are_the_scheme_and_only_linear_layers():
    x, w, b = torch.randn(5, 40), torch.randn(24, 40), torch.randn(24)
    with quantize.products("int8"):
        got = torch.nn.functional.linear(x, w, b)
        plain = x @ w.T  # a matmul is not a product with constant weights: it stays fp32
    np.testing.assert_allclose(got.numpy(), _reference(x.numpy(), w.numpy()) + b.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(plain.numpy(), (x @ w.T).numpy())


def test_the_reference_computes_erf_as_the_compiled_artifact_does():
    """The quantized reference's fp32 forms are the artifact's term for term (here TVM's fast_erf, its fused
    multiply-adds included), so a code on a rounding boundary rounds alike in both."""
    from tvm import te

    from edgekit.kernels.nan_semantics import fast_erf

    x = np.random.default_rng(0).standard_normal(4096).astype(np.float32) * 3
    placeholder = te.placeholder(x.shape, "float32")
    compiled = _run(te.create_prim_func([placeholder, fast_erf(placeholder)]), x, x.shape)
    with quantize.products("int8", artifact_forms=True):
        np.testing.assert_array_equal(torch.erf(torch.from_numpy(x)).numpy(), compiled)
    assert not np.array_equal(torch.erf(torch.from_numpy(x)).numpy(), compiled)  # torch's own erf differs


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    return compile("lmuformer", "host", tmp_path_factory.mktemp("q") / "lmu-int8", config="tiny", quantize="int8",
                   chunks=(1, 4))


def _linear_calls_per_step() -> int:
    """Products with constant weights in one step of the tiny LMUFormer, counted as PyTorch runs them."""
    from torch.overrides import TorchFunctionMode

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += func is torch.nn.functional.linear
            return func(*args, **(kwargs or {}))

    net = models.build("lmuformer", "tiny", None)
    with torch.no_grad(), Count():
        net.step(torch.zeros(1, net.input_size), net.init_state(1))
    return Count.calls


def test_an_int8_bundle_validates_against_its_quantized_reference(int8_bundle):
    m = int8_bundle.manifest
    assert m["precision"] == "int8" and m["quantization"]["isa"] == cpu_int8.isa(targets.get("host").tvm_target())
    assert sum(p["count"] for p in m["quantization"]["products"]) == _linear_calls_per_step()
    head, _ = quantize.weight_codes(models.build("lmuformer", "tiny", None).head.weight.detach().numpy())
    library = (int8_bundle.path / m["library"]).read_bytes()  # the head's codes are in it as int8, not widened
    assert np.ascontiguousarray(head.T).tobytes() in library
    assert np.ascontiguousarray(head.T).astype(np.int32).tobytes() not in library
    report = validate(int8_bundle.path, frames=600, chunk=4)
    assert report["passed"], report["checks"]
    assert {"logits_within_2_steps", "logits_codes_differing", "mean_logits_prediction"} <= set(report["checks"])
    assert report["outputs"]["logits"]["codes_differing"] <= 0.001
    kernel = report["kernel_check"]  # call by call from the artifact's own state: what judges the step criteria
    assert kernel["items"] >= 8 * 4 and kernel["outputs"]["logits"]["codes_differing"] <= 0.001
    effect = report["quantization_effect"]
    assert 0 < effect["outputs"]["logits"]["max_abs_error"] < 0.05 * effect["outputs"]["logits"]["reference_max_abs"]


def test_a_segment_lm_quantizes_too_and_reports_bits_per_byte(tmp_path):
    bundle = compile("hmt", "host", tmp_path / "hmt-int8", config="tiny", quantize="int8")
    assert bundle.manifest["quantization"]["products"]
    report = validate(bundle.path, segments=24, decode_segments=1)
    assert report["passed"], report["checks"]
    assert {"logits_within_2_steps", "next_byte_agreement"} <= set(report["checks"])
    kernel = report["kernel_check"]  # judges next-byte agreement too: the free-running reference runs HMT as written
    assert kernel["unit"] == "segments" and kernel["items"] == 23 and kernel["next_byte_agreement"] >= 0.999
    bits = report["quantization_effect"]["bits_per_byte"]
    assert abs(bits["artifact"] - bits["fp32"]) < 0.05


def test_a_kernel_that_drifts_from_the_reference_fails_validation(int8_bundle, tmp_path, monkeypatch):
    """The check can fail: a reference whose weight scales are 1 % off is caught in quantization steps."""
    real = quantize.weight_codes
    monkeypatch.setattr(quantize, "weight_codes", lambda w: (real(w)[0], real(w)[1] * np.float32(1.01)))
    report = validate(int8_bundle.path, frames=200, chunk=4, report_path=tmp_path / "v.json")
    assert not report["checks"]["logits_within_2_steps"]


def test_int8_is_refused_where_it_cannot_be_checked(tmp_path):
    with pytest.raises(CompileError, match="CUDA target"):
        compile("lmuformer", "jetson", tmp_path / "j", config="tiny", quantize="int8")
    with pytest.raises(CompileError, match="unknown quantization"):
        compile("lmuformer", "host", tmp_path / "x", config="tiny", quantize="int4")
    assert not any(tmp_path.iterdir())


def _disassembly(bundle) -> str:
    tool = shutil.which("aarch64-linux-gnu-objdump")
    return subprocess.run([tool, "-d", str(bundle.path / bundle.manifest["library"])], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.parametrize("mcpu,kind,mnemonic", [("znver4", "avx512-vnni", "vpdpbusd"),
                                                 ("skylake-avx512", "avx512-bw", "vpmaddubsw"),
                                                 ("haswell", "avx2", "vpmaddubsw")])
def test_x86_int8_kernels_use_the_best_dot_product_the_cpu_has(tmp_path, mcpu, kind, mnemonic):
    """Read off the target's features: VNNI where it exists, else AVX-512BW or AVX2's two-step products."""
    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu})
    assert cpu_int8.isa(target) == kind
    func = cpu_int8.dot_kernel(kind, 1, 64, 256).with_attr("global_symbol", "main")
    tvm.compile(tvm.IRModule({"main": func}), target=target).export_library(str(tmp_path / "k.so"))
    disassembly = subprocess.run(["objdump", "-d", str(tmp_path / "k.so")], capture_output=True, text=True,
                                 check=True).stdout
    assert f"\t{mnemonic} " in disassembly and ("vpdpbusd" in disassembly) == (kind == "avx512-vnni")


@pytest.mark.slow
def test_arm_int8_builds_use_sdot_only_where_the_core_has_it(tmp_path):
    pi5 = compile("lmuformer", "rpi5", tmp_path / "pi5", config="tiny", quantize="int8", chunks=(1, 4))
    pi4 = compile("lmuformer", "rpi4", tmp_path / "pi4", config="tiny", quantize="int8", chunks=(1, 4))
    assert pi5.manifest["quantization"]["isa"] == "sdot" and pi4.manifest["quantization"]["isa"] == "generic"
    assert "\tsdot\t" in _disassembly(pi5) and "\tsdot\t" not in _disassembly(pi4)
    report = validate(pi5.path, frames=200, chunk=4)  # under qemu-aarch64 -cpu cortex-a76, the Pi 5's core
    assert report["passed"] and "emulation" in report["execution"], report["checks"]
    assert report["kernel_check"]["items"] > 0  # the state read back from the emulated process, call by call
    assert json.loads((pi5.path / "manifest.json").read_text())["precision"] == "int8"


def test_a_device_copy_holds_what_a_board_needs_and_validates_there(int8_bundle, tmp_path):
    """`edgekit info --device-files` lists the library, manifest and golden record, not the ONNX graphs and
    weights; a copy of just those loads, validates against its golden record and says how it was judged."""
    from click.testing import CliRunner

    from edgekit.cli import main

    listed = CliRunner().invoke(main, ["info", str(int8_bundle.path), "--device-files"]).output.split()
    assert set(listed) == {"manifest.json", "model.so", "reference.npz"}
    copy = tmp_path / "device"
    for rel in listed:
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(int8_bundle.path / rel, copy / rel)
    info = CliRunner().invoke(main, ["info", str(copy)]).output
    assert "device payload" in info and "not in this copy" in info
    report = validate(copy)
    assert report["passed"] and "golden record" in report["reference"]
