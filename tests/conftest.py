import os
import sys

import pytest
import torch

# One intra-op thread in every test and every process a test starts: the models are tiny,
# so a second thread adds only synchronisation, and with two threads a busy neighbour on
# one core stalls every op (the language-model tests took 30x longer so). A test that
# needs threads sets them itself.
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
torch.set_num_threads(1)


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


@pytest.fixture
def drawn(monkeypatch):
    """The figures the commands save, by file name (and still written to disk)."""
    from ldfa_cli.analysis import figures
    from ldfa_cli.cli import plot_cmd

    kept, save = {}, figures.save_figure

    def saving(fig, out, fmt=None):
        path = save(fig, out, fmt)
        kept[path.name] = fig
        return path

    monkeypatch.setattr(figures, "save_figure", saving)
    monkeypatch.setattr(plot_cmd, "save_figure", saving)
    # modules that took the function by name when an earlier test imported them
    for name, module in list(sys.modules.items()):
        if name.startswith("ldfa_cli.") and getattr(module, "save_figure", None) is save:
            monkeypatch.setattr(module, "save_figure", saving)
    return kept
