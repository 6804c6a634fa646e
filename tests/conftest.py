import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def grads_of(module, names=None):
    return {
        n: p.grad.detach().clone()
        for n, p in module.named_parameters()
        if p.grad is not None and (names is None or n in names)
    }
