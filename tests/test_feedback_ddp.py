"""Two-process DDP (gloo, CPU): feedback grads returned by backward are all-reduced like any
parameter's, so after a few steps every tensor, Q and P included, is identical on both ranks."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ldfa_cli.feedback import convert


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)  # different init on each rank: DDP must broadcast rank 0's
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    x0 = torch.randn(8, 6)
    convert(model, "ldfa_local", rank=3, learn_q=True, example_input=x0)
    ddp = nn.parallel.DistributedDataParallel(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
    for step in range(3):
        g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own shard
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 4, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    torch.save(initial, os.path.join(out_dir, f"initial{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_two_ranks_stay_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert {"2.feedback_P", "2.feedback_Q", "4.feedback_P"} <= set(a)
    assert "0.feedback_P" not in a  # the first layer's input needs no gradient
    for key in a:
        assert torch.equal(a[key], b[key]), key
    initial = torch.load(tmp_path / "initial0.pt", weights_only=True)
    for key in ("2.feedback_P", "2.feedback_Q", "4.feedback_P", "4.weight"):
        assert not torch.equal(a[key], initial[key]), f"{key} did not learn"
