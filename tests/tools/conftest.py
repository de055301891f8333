"""The tool tests run tiny models: one intra-op thread, since more only add contention on
a shared machine (measured: 300 steps of a small MLP, 0.8 s on one thread, 30 s on two under load)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
