"""LoRA-GA under torch.distributed: two gloo processes on the CPU get the same init as one process over the union of
their data (rank 0 has 3 batches, rank 1 has 1: the average is over the union's 4 batches)."""

import copy
import os

import pytest
import torch
import torch.nn as nn

import lora_kernels as lk

from _dist_helpers import gloo_available, spawn

TARGETS = ["up", "mid", "head"]
# Each spawned rank imports torch first (12 s for `import lora_kernels` at a load average of 40 on 2 cores) and the
# rendezvous waits for the slower rank: these limits only bound a real hang, far above any start-up skew.
JOIN_TIMEOUT_S = 600
PG_TIMEOUT_S = 300


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.mid = nn.Linear(16, 16)
        self.head = nn.Linear(16, 8)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def make_model_and_data():
    torch.manual_seed(0)
    model = Net()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 12, generator=gen), torch.randn(8, 8, generator=gen)) for _ in range(4)]
    return model, batches


def rank_batches(batches, rank):
    return batches[:3] if rank == 0 else batches[3:]


def _worker(rank, out_dir):
    model, batches = make_model_and_data()
    layers = lk.lora_ga_init(
        model, rank_batches(batches, rank), loss_fn, r=2, alpha=8, target_modules=TARGETS, backend="torch"
    )
    state = {
        f"{n}.{k}": getattr(l, k).detach().clone() for n, l in layers.items() for k in ("lora_A", "lora_B", "weight")
    }
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available in this build")
def test_two_gloo_ranks_match_single_process_over_union(tmp_path):
    spawn(_worker, tmp_path, pg_timeout_s=PG_TIMEOUT_S, join_timeout_s=JOIN_TIMEOUT_S)
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")

    model, batches = make_model_and_data()
    single = lk.lora_ga_init(
        copy.deepcopy(model), batches, loss_fn, r=2, alpha=8, target_modules=TARGETS, backend="torch"
    )
    alone = lk.lora_ga_init(
        copy.deepcopy(model), rank_batches(batches, 0), loss_fn, r=2, alpha=8, target_modules=TARGETS, backend="torch"
    )
    for n, layer in single.items():
        for k in ("lora_A", "lora_B", "weight"):
            key = f"{n}.{k}"
            # both ranks hold the same adapters (bit for bit: same reduced gradient, same seeded projections) ...
            torch.testing.assert_close(r0[key], r1[key], atol=0, rtol=0)
            # ... equal to one process over all the data, up to the summation order of the reduction
            torch.testing.assert_close(r0[key], getattr(layer, k).detach(), atol=2e-5, rtol=1e-4)
        # and not what rank 0 would compute from its own data alone (the reduction really happened)
        assert not torch.allclose(
            r0[f"{n}.lora_B"] @ r0[f"{n}.lora_A"], (alone[n].lora_B @ alone[n].lora_A).detach(), atol=1e-3
        )
