"""FSDP2 (``fully_shard``) over LoRALinear: two gloo ranks on the CPU.

One spawn runs every check (process start-up dominates the cost): training steps equal the single-process run on the
union of the ranks' data; the fused op only ever sees whole, plain weights; merge/unmerge on the shards; the adapter
state dict, ``save_adapter`` (rank 0 writes, once; the file equals the single-process file and loads in PEFT) and
``load_adapter`` into a sharded model; a bf16 mixed-precision policy with fp32 reduction; and a bad argument on one
rank raising the same error on both ranks, with nothing written or loaded."""

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from _tolerances import close_small_k

import lora_kernels as lk
from lora_kernels.adapter_files import CONFIG_NAME, WEIGHTS_NAME

from _dist_helpers import WORLD, expect_error, gloo_available, spawn

pytestmark = pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")

STEPS = 3
D_IN, D_HID, D_OUT = 12, 17, 5  # 17 rows: uneven shards (9 + 8); r = 3: lora_A shards of 2 + 1 rows
TARGETS = ["0", "2"]


def _base():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID), nn.Tanh(), nn.Linear(D_HID, D_HID), nn.Tanh(), nn.Linear(D_HID, D_OUT))


def _model(b_std=0.1):
    model = _base()
    lk.inject_lora(model, TARGETS, r=3, alpha=6, backend="torch")
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for layer in lk.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * b_std)
    return model


def _data(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, D_IN, generator=g), torch.randn(4, D_OUT, generator=g)


def _union(step):
    xs, ys = zip(*[_data(r, step) for r in range(WORLD)])
    return torch.cat(xs), torch.cat(ys)


def _shard(model, mesh, **kw):
    from torch.distributed.fsdp import fully_shard

    for name in TARGETS:
        fully_shard(model[int(name)], mesh=mesh, **kw)
    fully_shard(model, mesh=mesh, **kw)
    return model


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _worker(rank, out_dir):
    import safetensors.torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from lora_kernels.distributed import full, is_dtensor, local
    from lora_kernels.reference import lora_linear as ref_op

    mesh = init_device_mesh("cpu", (WORLD,))
    close = dict(atol=2e-6, rtol=2e-6)

    # -------- what the fused op receives: record the weight of every forward and backward call
    seen = []
    fwd, bwd = ref_op.lora_linear_forward, ref_op.lora_linear_backward

    def rec_fwd(x, weight, *a, **k):
        seen.append(("fwd", type(weight), tuple(weight.shape)))
        return fwd(x, weight, *a, **k)

    def rec_bwd(dy, x, weight, *a, **k):
        seen.append(("bwd", type(weight), tuple(weight.shape)))
        return bwd(dy, x, weight, *a, **k)

    ref_op.lora_linear_forward, ref_op.lora_linear_backward = rec_fwd, rec_bwd

    # -------- training: FSDP2 on the rank's data == one process on the union
    ref = _model()
    model = _shard(_model(), mesh)
    assert is_dtensor(model[0].weight) and tuple(local(model[0].weight).shape) == (
        (9, D_IN) if rank == 0 else (8, D_IN)
    )
    opt = torch.optim.AdamW(_trainable(model), lr=1e-2)
    ref_opt = torch.optim.AdamW(_trainable(ref), lr=1e-2)
    for step in range(STEPS):
        x, y = _data(rank, step)
        loss = F.mse_loss(model(x), y)
        loss.backward()
        ref_loss = F.mse_loss(ref(_union(step)[0]), _union(step)[1])
        ref_loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        torch.testing.assert_close(mean / WORLD, ref_loss.detach(), **close)
        for (n, p), (n2, q) in zip(model.named_parameters(), ref.named_parameters()):
            assert n == n2 and p.requires_grad == q.requires_grad, (n, n2)
            if p.requires_grad:
                assert is_dtensor(p.grad), n
                torch.testing.assert_close(full(p.grad), q.grad, **close, msg=f"step {step} grad {n}")
        opt.step(), ref_opt.step()
        opt.zero_grad(), ref_opt.zero_grad()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(full(p), q.detach(), **close, msg=n)
    ref_op.lora_linear_forward, ref_op.lora_linear_backward = fwd, bwd
    # whole plain weights, never a DTensor or a shard, in forward and in backward
    shapes = {(D_HID, D_IN), (D_HID, D_HID)}
    assert {s[0] for s in seen} == {"fwd", "bwd"}
    assert all(t is torch.Tensor or t is nn.Parameter for _, t, _ in seen), seen
    assert {s for _, _, s in seen} == shapes, seen

    # -------- merge / unmerge on the shards
    model.eval(), ref.eval()
    x = _union(0)[0]
    before = {n: local(l.weight).clone() for n, l in lk.lora_layers(model).items()}
    for n, layer in lk.lora_layers(model).items():
        layer.merge()
        ref[int(n)].merge()
        assert layer.merged
        torch.testing.assert_close(full(layer.weight), ref[int(n)].weight.detach(), **close)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), **close)
    model.reshard()
    for n, layer in lk.lora_layers(model).items():
        layer.unmerge()
        ref[int(n)].unmerge()
        assert torch.equal(local(layer.weight), before[n]), n  # bit for bit
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), **close)
    model.reshard()
    model.train(), ref.train()

    # -------- adapter state dict and files
    sd, ref_sd = lk.lora_state_dict(model), lk.lora_state_dict(ref)
    assert list(sd) == list(ref_sd)
    for k in sd:
        assert not is_dtensor(sd[k]) and sd[k].shape == ref_sd[k].shape
        torch.testing.assert_close(sd[k], ref_sd[k], **close)
    writes = []
    save_file = safetensors.torch.save_file

    def counting_save_file(*a, **k):
        writes.append(a[1] if len(a) > 1 else k.get("filename"))
        return save_file(*a, **k)

    safetensors.torch.save_file = counting_save_file
    cfg = lk.save_adapter(model, os.path.join(out_dir, "sharded"))
    safetensors.torch.save_file = save_file
    assert len(writes) == (1 if rank == 0 else 0), writes  # rank 0 writes, once; the others nothing
    assert cfg["r"] == 3 and cfg["target_modules"] == TARGETS
    if rank == 0:
        lk.save_adapter(ref, os.path.join(out_dir, "single"))
        torch.save({k: v.clone() for k, v in ref.state_dict().items()}, os.path.join(out_dir, "ref_state.pt"))
    dist.barrier()

    # load into a fresh sharded model (other adapter values): its adapter becomes the file's
    fresh = _shard(_model(b_std=0.0), mesh)
    loaded = lk.load_adapter(fresh, os.path.join(out_dir, "sharded"))
    assert sorted(loaded) == TARGETS
    for k, v in lk.lora_state_dict(fresh).items():
        torch.testing.assert_close(v, sd[k], atol=0, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), ref(x), **close)

    # load_lora_state_dict with whole tensors (what lora_state_dict returns) into a sharded model
    other = _shard(_model(b_std=0.0), mesh)
    res = lk.load_lora_state_dict(other, sd)
    assert res.missing_keys == [] and res.unexpected_keys == []
    for k, v in lk.lora_state_dict(other).items():
        assert torch.equal(v, sd[k]), k
    partial_sd = {k: v for k, v in sd.items() if rank == 0 or k != "2.lora_B"}  # rank 1 lacks a key
    before_other = lk.lora_state_dict(other)
    expect_error(
        lambda: lk.load_lora_state_dict(other, {k: v * 2 for k, v in partial_sd.items()}),
        out_dir,
        rank,
        "load_sd_missing",
    )
    for k, v in lk.lora_state_dict(other).items():
        assert torch.equal(v, before_other[k]), k  # nothing loaded on either rank

    # -------- a bad argument on ONE rank: the same clear error on every rank, nothing written / loaded, no hang
    bad_path = os.path.join(out_dir, "never_written")
    expect_error(lambda: lk.save_adapter(model, bad_path if rank == 0 else 123), out_dir, rank, "save_bad_path")
    missing = os.path.join(out_dir, "sharded" if rank == 0 else "does_not_exist")
    before_sd = lk.lora_state_dict(fresh)
    expect_error(lambda: lk.load_adapter(fresh, missing), out_dir, rank, "load_missing")
    for k, v in lk.lora_state_dict(fresh).items():
        assert torch.equal(v, before_sd[k]), k
    assert not os.path.exists(bad_path)
    dist.barrier()

    # -------- mixed precision: bf16 parameters in forward/backward, fp32 gradient reduction and fp32 shards
    mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mixed = _shard(_model(), mesh, mp_policy=mp_policy)
    ref32 = _model()
    x, y = _data(rank, 0)
    loss = F.mse_loss(mixed(x), y)
    assert loss.dtype == torch.float32 or loss.dtype == torch.bfloat16
    loss.backward()
    F.mse_loss(ref32(_union(0)[0]), _union(0)[1]).backward()
    for (n, p), (_, q) in zip(mixed.named_parameters(), ref32.named_parameters()):
        if p.requires_grad:
            assert p.grad.dtype == torch.float32, (n, p.grad.dtype)
            g = full(p.grad)
            assert torch.isfinite(g).all()
            # bf16 forward/backward: a few bf16 ulps of the gradient's scale
            torch.testing.assert_close(g, q.grad, atol=3e-2 * float(q.grad.abs().max()), rtol=0, msg=n)


def test_fsdp2_lora_two_ranks(tmp_path):
    spawn(_worker, tmp_path)

    # the file written by the sharded run is the single-process file (tensors to reduction order; config exactly)
    from safetensors import safe_open
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "sharded" / WEIGHTS_NAME), load_file(tmp_path / "single" / WEIGHTS_NAME)
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=2e-6)
    cfg_a = json.loads((tmp_path / "sharded" / CONFIG_NAME).read_text())
    cfg_b = json.loads((tmp_path / "single" / CONFIG_NAME).read_text())
    assert cfg_a == cfg_b
    with safe_open(str(tmp_path / "sharded" / WEIGHTS_NAME), framework="pt") as f:
        assert f.metadata()["lora_kernels.base"] == "original"
    assert not (tmp_path / "sharded" / (WEIGHTS_NAME + ".tmp")).exists()

    # PEFT loads the sharded run's file and computes the trained model's function
    peft = pytest.importorskip("peft")
    state = torch.load(tmp_path / "ref_state.pt")
    trained = _model()
    trained.load_state_dict(state)
    pm = peft.PeftModel.from_pretrained(_base(), str(tmp_path / "sharded"))
    x = torch.randn(3, D_IN)
    with torch.no_grad():
        torch.testing.assert_close(pm(x), trained(x), **close_small_k())

    # one bad rank: both ranks raised the same error, naming the bad rank and the argument
    for tag, cls, words in [
        ("save_bad_path", "TypeError", ["path must be a str", "rank 1"]),
        ("load_missing", "FileNotFoundError", ["does_not_exist", "rank 1"]),
        ("load_sd_missing", "ValueError", ["missing keys: 2.lora_B", "rank 1"]),
    ]:
        r0, r1 = torch.load(tmp_path / f"{tag}_rank0.pt"), torch.load(tmp_path / f"{tag}_rank1.pt")
        assert r0 == r1, (tag, r0, r1)
        assert r0[0] == cls, (tag, r0)
        assert all(w in r0[1] for w in words), (tag, r0)


def test_example_train_fsdp_runs_with_torchrun(tmp_path):
    """examples/train_fsdp.py under torchrun on two CPU processes: LoRA-GA on the shards, training, save_adapter and
    the PEFT reload check inside the script (it exits non-zero when the reload differs)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
    )
    out = tmp_path / "adapter"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            os.path.join(root, "examples", "train_fsdp.py"),
            "--out",
            str(out),
            "--steps",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PEFT reload max" in proc.stdout, proc.stdout
    assert (out / WEIGHTS_NAME).is_file() and (out / CONFIG_NAME).is_file()
