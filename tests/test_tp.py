"""Tensor parallel LoRALinear (DTensor, ``parallelize_module``) on two gloo ranks: colwise (W0, lora_B, bias sharded
by rows; lora_A replicated) and rowwise (W0, lora_A sharded by columns; lora_B, bias replicated) give the unsharded
layer's outputs and gradients, the fused op runs on the local shards, W0 is never all-gathered and a colwise →
rowwise pair costs one all-reduce in forward; merge/unmerge and the adapter state dict work on the shards."""

import copy
import os

import pytest
import torch
import torch.nn as nn

import lora_kernels as lk

from _dist_helpers import WORLD, gloo_available, spawn

pytestmark = pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")

# Colwise output rows may split unevenly (11 = 6 + 5); a rowwise layer's input is annotated by torch's
# RowwiseParallel with DTensor.from_local without a shape, which assumes even shards, so its in_features are even.
D_IN, D_HID, D_OUT, D_MLP = 14, 11, 9, 12
CLOSE = dict(atol=2e-6, rtol=2e-6)


def _layer(i, o, seed, bias=True):
    torch.manual_seed(seed)
    layer = lk.LoRALinear(i, o, r=3, alpha=6, bias=bias, backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.3)
        layer.weight.requires_grad_(True)  # W0's gradient is checked too (colwise: rows, rowwise: columns)
    return layer


def _counts(mode):
    return {str(k): v for k, v in mode.get_comm_counts().items()}


def _worker(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.distributed.tensor.parallel import parallelize_module

    from lora_kernels.distributed import LoRAColwiseParallel, LoRARowwiseParallel, full, local, local_slices
    from lora_kernels.reference import lora_linear as ref_op

    mesh = init_device_mesh("cpu", (WORLD,))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, D_IN, generator=g)
    report = {}

    # the op must see local shards, never a DTensor
    seen, active = [], [False]
    fwd = ref_op.lora_linear_forward

    def rec_fwd(x_, w_, *a, **k):
        if active[0]:  # the sharded layers' calls only (the reference layers see their whole weights)
            seen.append((type(w_), tuple(w_.shape)))
        return fwd(x_, w_, *a, **k)

    ref_op.lora_linear_forward = rec_fwd

    for bias in (True, False):
        # ---------------- colwise
        ref = _layer(D_IN, D_HID, 1, bias)
        col = parallelize_module(copy.deepcopy(ref), mesh, LoRAColwiseParallel())
        rows = local_slices(col.weight)[0]
        assert tuple(local(col.lora_A).shape) == (3, D_IN)  # replicated
        assert local(col.lora_B).shape[0] == rows.stop - rows.start
        xr = x.clone().requires_grad_(True)
        xc = x.clone().requires_grad_(True)
        gy = torch.randn(2, 3, D_HID, generator=g)
        active[0] = True
        with CommDebugMode() as mode:
            y = col(xc)  # local output columns
            (y * gy[..., rows]).sum().backward()
        active[0] = False
        report[f"colwise bias={bias}"] = _counts(mode)
        y_ref = ref(xr)
        (y_ref * gy).sum().backward()
        torch.testing.assert_close(y, y_ref[..., rows].detach(), **CLOSE)
        torch.testing.assert_close(xc.grad, xr.grad, **CLOSE)
        for n in ("weight", "lora_A", "lora_B") + (("bias",) if bias else ()):
            torch.testing.assert_close(full(getattr(col, n).grad), getattr(ref, n).grad, **CLOSE, msg=n)

        # ---------------- rowwise (the input arrives sharded by its last dim)
        ref = _layer(D_IN, D_OUT, 2, bias)
        row = parallelize_module(copy.deepcopy(ref), mesh, LoRARowwiseParallel())
        cols = local_slices(row.weight)[1]
        assert tuple(local(row.lora_B).shape) == (D_OUT, 3)  # replicated
        assert local(row.lora_A).shape[1] == cols.stop - cols.start
        xr = x.clone().requires_grad_(True)
        xs = x[..., cols].clone().requires_grad_(True)
        gy = torch.randn(2, 3, D_OUT, generator=g)
        active[0] = True
        with CommDebugMode() as mode:
            y = row(xs)  # replicated: one all-reduce of base and LoRA partial sums together
            (y * gy).sum().backward()
        active[0] = False
        report[f"rowwise bias={bias}"] = _counts(mode)
        y_ref = ref(xr)
        (y_ref * gy).sum().backward()
        torch.testing.assert_close(y, y_ref.detach(), **CLOSE)
        torch.testing.assert_close(xs.grad, xr.grad[..., cols], **CLOSE)
        for n in ("weight", "lora_A", "lora_B") + (("bias",) if bias else ()):
            torch.testing.assert_close(full(getattr(row, n).grad), getattr(ref, n).grad, **CLOSE, msg=n)
    ref_op.lora_linear_forward = fwd
    assert len(seen) == 4 and all(t is torch.Tensor for t, _ in seen), seen
    assert all(s not in {(D_HID, D_IN), (D_OUT, D_IN)} for _, s in seen), seen  # shards, never the whole W0

    # ---------------- an MLP: colwise → rowwise, the Megatron pair; merge / unmerge and the state dict
    ref = nn.Sequential(_layer(D_IN, D_MLP, 3), nn.ReLU(), _layer(D_MLP, D_OUT, 4))
    mlp = parallelize_module(copy.deepcopy(ref), mesh, {"0": LoRAColwiseParallel(), "2": LoRARowwiseParallel()})
    with CommDebugMode() as mode:
        y = mlp(x)
    report["mlp forward"] = _counts(mode)
    torch.testing.assert_close(y, ref(x).detach(), **CLOSE)
    sd, ref_sd = lk.lora_state_dict(mlp), lk.lora_state_dict(ref)
    assert list(sd) == list(ref_sd)
    for k in sd:
        torch.testing.assert_close(sd[k], ref_sd[k], atol=0, rtol=0)
    before = {i: local(mlp[i].weight).clone() for i in (0, 2)}
    mlp.eval(), ref.eval()
    with torch.no_grad():
        for i in (0, 2):
            mlp[i].merge()
            ref[i].merge()
            torch.testing.assert_close(full(mlp[i].weight), ref[i].weight, **CLOSE)
        torch.testing.assert_close(mlp(x), ref(x), **CLOSE)
        for i in (0, 2):
            mlp[i].unmerge()
            ref[i].unmerge()
            assert torch.equal(local(mlp[i].weight), before[i])
        torch.testing.assert_close(mlp(x), ref(x), **CLOSE)
    # LoRA-GA's gradient hooks assume data-parallel shards: refused on tensor-parallel layers, on every rank
    from _dist_helpers import expect_error

    expect_error(
        lambda: lk.lora_ga_init(mlp, [x], lambda m, b: m(b).sum(), r=3, target_modules=["0"]), out_dir, rank, "ga_tp"
    )
    torch.save(report, os.path.join(out_dir, f"comms{rank}.pt"))


def test_tensor_parallel_lora_two_ranks(tmp_path):
    spawn(_worker, tmp_path)
    for rank in range(WORLD):
        report = torch.load(tmp_path / f"comms{rank}.pt")
        for what, counts in report.items():
            # W0 is never gathered: no all-gather of any kind, whatever the layout
            assert not any("all_gather" in k for k in counts), (what, counts)
        # the colwise → rowwise pair: one all-reduce in forward (base and LoRA partial sums together)
        assert sum(report["mlp forward"].values()) == 1, report["mlp forward"]
        assert sum(v for k, v in report["mlp forward"].items() if "all_reduce" in k) == 1, report["mlp forward"]
        print(rank, report)
    e0, e1 = torch.load(tmp_path / "ga_tp_rank0.pt"), torch.load(tmp_path / "ga_tp_rank1.pt")
    assert e0 == e1 and e0[0] == "ValueError" and "tensor-parallel" in e0[1], (e0, e1)
