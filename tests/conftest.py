import pytest
import torch

from edgekit.compile import compile


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """One small LMUFormer bundle for the host, built once per test session (step, chunk4, flush)."""
    out = tmp_path_factory.mktemp("bundles") / "lmu-tiny"
    return compile("lmuformer", "host", out, config="tiny", chunks=(1, 4))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Per-token ops are tiny: intra-op threads only add synchronisation, which stalls on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
