"""tests/cuda run only where a CUDA device is available; elsewhere every test here is skipped with the reason."""
import pathlib

import pytest
import torch

_HERE = pathlib.Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    # This hook sees every collected item, not only this folder's: touch only the tests under tests/cuda.
    ours = [item for item in items if _HERE in pathlib.Path(str(item.fspath)).resolve().parents]
    for item in ours:
        item.add_marker(pytest.mark.cuda)
    if not torch.cuda.is_available():
        reason = f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}; torch.cuda.is_available() is False)"
        for item in ours:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")  # session scope: hypothesis tests may use it
def cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())
