import pytest
import torch
from click.testing import CliRunner

from edgekit.artifact import load
from edgekit.cli import main
from edgekit.compile import compile


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """One small LMUFormer bundle for the host, built once per test session (step, chunk4, flush)."""
    out = tmp_path_factory.mktemp("bundles") / "lmu-tiny"
    return compile("lmuformer", "host", out, config="tiny", chunks=(1, 4))


@pytest.fixture(scope="session")
def tiny_segment_bundle(tmp_path_factory):
    """One small HMT bundle for the host with its native runner, built once per test session by `edgekit compile
    hmt --config tiny --runner` (the flag the runner tests check)."""
    out = tmp_path_factory.mktemp("bundles") / "hmt-tiny"
    result = CliRunner().invoke(main, ["compile", "hmt", "--config", "tiny", "-o", str(out), "--runner"])
    assert result.exit_code == 0, result.output
    return load(out)


@pytest.fixture(scope="session")
def tiny_memory_bundle(tmp_path_factory):
    """One small memlm bundle (a memory bank) for the host with its native runner, built once per test session."""
    out = tmp_path_factory.mktemp("bundles") / "memlm-tiny"
    result = CliRunner().invoke(main, ["compile", "memlm", "--config", "tiny", "-o", str(out), "--runner"])
    assert result.exit_code == 0, result.output
    return load(out)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Per-token ops are tiny: intra-op threads only add synchronisation, which stalls on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
