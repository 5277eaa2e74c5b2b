import os

# Every Triton kernel is exercised on CPU through the interpreter; set before triton is imported.
try:
    import torch
    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    require = os.environ.get("PRUNEKIT_REQUIRE_CUDA") == "1"
    if _has_cuda:
        return
    if require:
        raise pytest.UsageError("PRUNEKIT_REQUIRE_CUDA=1 but torch sees no CUDA device")
    skip = pytest.mark.skip(reason="needs a CUDA device (GPU tests run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_selfcheck():
    """Each test starts with no self-check verdicts (ops/selfcheck.py keeps them for the process)."""
    yield
    from prunekit.ops import selfcheck

    selfcheck.reset()
