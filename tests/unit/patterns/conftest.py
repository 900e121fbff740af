import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    # These tests train small networks; one thread keeps them fast on a shared, loaded machine
    # (several threads spinning against other processes' work cost far more than they gain).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
