"""DistributedDataParallel over LoRALinear: two gloo processes on the CPU, different data per rank, must end with
identical adapters equal to single-process SGD on the averaged gradients, and a base that did not move."""

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _tolerances import close_small_k

import lora_kernels as lk

from _dist_helpers import WORLD, gloo_available, spawn

STEPS = 4
LR = 0.5
D_IN, D_HID, D_OUT = 12, 17, 5  # odd sizes on purpose
# One gloo step takes milliseconds, but each spawned rank imports torch first (12 s for `import lora_kernels` at a
# load average of 40 on 2 cores), and the two ranks need not get the CPU at the same time: the rendezvous waits for
# the slower one. These limits only bound a real hang, so they sit far above any start-up skew.
JOIN_TIMEOUT_S = 600  # whole run
PG_TIMEOUT_S = 300  # rendezvous and each collective: a peer that died fails the run after this, not never


def _model() -> nn.Module:
    torch.manual_seed(0)  # the same base and adapter on every rank
    model = nn.Sequential(
        nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT)
    )
    # gaussian init with a non-zero B so both A and B get gradients from the first step
    lk.inject_lora(model, ["0", "2"], r=3, alpha=6, init="gaussian", backend="torch")
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.normal_(0, 0.1)
    return model


def _data(rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * rank + step)  # different data per rank and step
    return torch.randn(6, D_IN, generator=g), torch.randn(6, D_OUT, generator=g)


def _train(rank: int) -> dict:
    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        x, y = _data(rank, step)
        opt.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _worker(rank: int, out_dir: str) -> None:
    # DDP's reducer owns a reference to the process group: train in a function, so that nothing of it is left when the
    # group is destroyed (spawn collects garbage, then barriers, then destroys).
    torch.save(_train(rank), os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture
def one_thread():
    # Tiny shapes: one intra-op thread is fastest, and a second one spinning on a loaded 2-core machine is very slow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference():
    """One process: SGD on the average over ranks of each rank's loss gradient, which is what DDP computes."""
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        opt.zero_grad()
        for rank in range(WORLD):
            x, y = _data(rank, step)
            (F.mse_loss(model(x), y) / WORLD).backward()
        opt.step()
    return model.state_dict()


@pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available in this build")
def test_ddp_two_gloo_processes_end_with_identical_adapters(tmp_path, one_thread):
    spawn(_worker, tmp_path, pg_timeout_s=PG_TIMEOUT_S, join_timeout_s=JOIN_TIMEOUT_S)

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    initial = _model().state_dict()
    expected = _reference()
    lora_keys = sorted(k for k in initial if "lora_" in k)
    assert lora_keys == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    for key in initial:
        a, b = results[0][key], results[1][key]
        assert torch.equal(a, b), f"{key} differs between ranks"
        assert torch.isfinite(a).all(), key
        if key in lora_keys:
            assert not torch.equal(a, initial[key]), f"{key} did not train"
            # start + (-lr)·(average of the ranks' gradients), step after step
            torch.testing.assert_close(a, expected[key], **close_small_k())
        else:
            assert torch.equal(a, initial[key]), f"frozen {key} moved"
