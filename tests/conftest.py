import pytest
import torch

# Small shapes everywhere: one thread is fastest and keeps parallel test workers from fighting.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
