import pytest

from edgekit.compile import compile


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """One small LMUFormer bundle for the host, built once per test session (step, chunk4, flush)."""
    out = tmp_path_factory.mktemp("bundles") / "lmu-tiny"
    return compile("lmuformer", "host", out, config="tiny", chunks=(1, 4))
