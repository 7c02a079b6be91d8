"""LoRA-GA and PiSSA re-initialising LoRALinear layers that are already injected, on one process and on an
FSDP2-sharded model over two gloo ranks (row-sharded gradients and SVD), plus the memory a rank needs for it."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from _tolerances import close_small_k

import lora_kernels as lk
from lora_kernels.init.pissa import INIT_RECORD

from _dist_helpers import WORLD, expect_error, gloo_available, spawn

TARGETS = ["up", "mid", "head"]


class Net(nn.Module):
    def __init__(self, d_in=12, d_hid=17, d_out=9):
        super().__init__()
        self.up = nn.Linear(d_in, d_hid)
        self.mid = nn.Linear(d_hid, d_hid)
        self.head = nn.Linear(d_hid, d_out)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def loss_fn(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def make_model_and_data():
    torch.manual_seed(0)
    model = Net()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 12, generator=gen), torch.randn(8, 9, generator=gen)) for _ in range(4)]
    return model, batches


def injected(model, r=2, alpha=8):
    lk.inject_lora(model, TARGETS, r=r, alpha=alpha, use_rslora=True, backend="torch")
    return model


def _align(A, B, A_ref, B_ref):
    """Flip rows of A / columns of B to the reference's signs (the plain path does not fix SVD signs)."""
    sa = torch.sign((A * A_ref).sum(1, keepdim=True))
    sb = torch.sign((B * B_ref).sum(0, keepdim=True))
    return A * sa, B * sb


def test_reinit_of_injected_layers_matches_the_replacing_path():
    model, batches = make_model_and_data()
    plain = lk.lora_ga_init(
        copy.deepcopy(model), batches, loss_fn, r=2, alpha=8, target_modules=TARGETS, backend="torch"
    )
    m2 = injected(copy.deepcopy(model))
    before = {n: l for n, l in lk.lora_layers(m2).items()}
    re = lk.lora_ga_init(m2, batches, loss_fn, r=2, alpha=8, target_modules=TARGETS)
    assert list(re) == TARGETS and all(re[n] is before[n] for n in TARGETS)  # the same layers, re-initialised
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(m2(x), model(x), atol=2e-6, rtol=1e-5)  # the function is unchanged
    for n in TARGETS:
        a, b = re[n], plain[n]
        assert a.scaling == b.scaling and a.alpha == b.alpha and a.use_rslora
        A, B = _align(a.lora_A.detach(), a.lora_B.detach(), b.lora_A.detach(), b.lora_B.detach())
        # two randomized SVDs with different test matrices: equal to the SVD's accuracy
        torch.testing.assert_close(A, b.lora_A.detach(), atol=2e-3, rtol=0)
        torch.testing.assert_close(B, b.lora_B.detach(), atol=2e-3, rtol=0)
        assert getattr(a, INIT_RECORD) is not None
        assert a.lora_A.requires_grad and a.lora_B.requires_grad and not a.weight.requires_grad


def test_reinit_refuses_bad_arguments_and_changes_nothing():
    model, batches = make_model_and_data()
    m = injected(model)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="keeps its rank"):
        lk.lora_ga_init(m, batches, loss_fn, r=3, alpha=8, target_modules=TARGETS)
    lk.lora_layers(m)["mid"].merge()
    with pytest.raises(ValueError, match="merged"):
        lk.lora_ga_init(m, batches, loss_fn, r=2, alpha=8, target_modules=TARGETS)
    lk.lora_layers(m)["mid"].unmerge()
    with pytest.raises(ValueError, match="direction"):
        lk.lora_ga_init(m, batches, loss_fn, r=2, target_modules=TARGETS, direction="sideways")
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


# ------------------------------------------------------------------------------------------ two ranks
MEM_LAYERS, MEM_DIM = 16, 512  # 1 MiB of fp32 gradient per layer, 16 MiB for the model


def _spectral(model, seed=7):
    """Give every weight a decaying spectrum, so that randomized and exact SVDs agree (PiSSA's comparison)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (model.up, model.mid, model.head):
            m, n = lin.weight.shape
            k = min(m, n)
            U = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64)).Q
            V = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q
            lin.weight.copy_(U @ torch.diag(torch.logspace(0, -3, k, dtype=torch.float64)) @ V.T)
    return model


def _shard_all(model, mesh):
    from torch.distributed.fsdp import fully_shard

    for layer in lk.lora_layers(model).values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _whole(model):
    from lora_kernels.distributed import full

    return {
        f"{n}.{k}": full(getattr(l, k)).clone()
        for n, l in lk.lora_layers(model).items()
        for k in ("lora_A", "lora_B", "weight")
    }


def _rss():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def _peak_memory(rank, mesh):
    """Peak resident memory added by a sharded lora_ga_init on this rank (Linux: VmHWM reset by clear_refs)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD fixed: every tensor buffer is mapped and unmapped at once
        libc.mallopt(-1, 64 * 1024)  # M_TRIM_THRESHOLD
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    torch.manual_seed(0)
    layers = []
    for _ in range(MEM_LAYERS):
        layers += [nn.Linear(MEM_DIM, MEM_DIM), nn.Tanh()]
    model = nn.Sequential(*layers)
    lk.inject_lora(model, r".*\d+", r=2, alpha=4, backend="torch")
    _shard_all(model, mesh)
    gen = torch.Generator().manual_seed(10 + rank)
    batches = [torch.randn(4, MEM_DIM, generator=gen) for _ in range(2)]
    loss = lambda m, x: (m(x) ** 2).mean()  # noqa: E731
    loss(model, batches[0]).backward()  # FSDP's lazy init and first all-gathers, outside the measurement
    for p in model.parameters():
        p.grad = None
    model.reshard()
    dist.barrier()
    base, _ = _rss()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    lk.lora_ga_init(model, batches, loss, r=2, alpha=4, target_modules=r".*\d+")
    _, peak = _rss()
    return peak - base


def _worker(rank, out_dir):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    model, batches = make_model_and_data()
    mine = batches[:2] if rank == 0 else batches[2:]  # FSDP: the same number of batches on every rank

    # LoRA-GA on FSDP2 shards
    sharded = _shard_all(injected(copy.deepcopy(model)), mesh)
    from lora_kernels.distributed import local

    rows = local(sharded.mid.weight).shape[0]
    assert rows == (9 if rank == 0 else 8)
    layers = lk.lora_ga_init(sharded, mine, loss_fn, r=2, alpha=8, target_modules=TARGETS)
    assert list(layers) == TARGETS
    result = {"ga": _whole(sharded), "record": {n: getattr(l, INIT_RECORD) for n, l in layers.items()}}
    x = batches[0][0]
    with torch.no_grad():
        result["out"] = sharded(x).clone()
    sharded.reshard()

    # data parallel over whole weights (unequal batch counts): one reduction at the end
    dp = injected(copy.deepcopy(model))
    lk.lora_ga_init(dp, batches[:3] if rank == 0 else batches[3:], loss_fn, r=2, alpha=8, target_modules=TARGETS)
    result["dp"] = _whole(dp)

    # PiSSA on the row shards
    pissa = _shard_all(injected(_spectral(copy.deepcopy(model)), r=3, alpha=3), mesh)
    for layer in lk.lora_layers(pissa).values():
        lk.pissa_init(layer, niter=6, generator=torch.Generator().manual_seed(3))
    result["pissa"] = _whole(pissa)

    # one rank with a bad argument: the same error everywhere, nothing changed
    before = _whole(sharded)
    expect_error(
        lambda: lk.lora_ga_init(sharded, mine, loss_fn, r=2 if rank == 0 else 5, alpha=8, target_modules=TARGETS),
        out_dir,
        rank,
        "ga_bad_r",
    )
    expect_error(lambda: lk.pissa_init(lk.lora_layers(pissa)["up"], niter=None), out_dir, rank, "pissa_no_niter")
    after = _whole(sharded)
    assert all(torch.equal(before[k], after[k]) for k in before)

    result["peak"] = _peak_memory(rank, mesh)
    torch.save(result, os.path.join(out_dir, f"result{rank}.pt"))


@pytest.mark.skipif(not gloo_available(), reason="torch.distributed with gloo is not available")
def test_lora_ga_and_pissa_on_fsdp2_shards_match_one_process(tmp_path):
    spawn(_worker, tmp_path)
    r0, r1 = torch.load(tmp_path / "result0.pt"), torch.load(tmp_path / "result1.pt")
    model, batches = make_model_and_data()

    # one process, whole weights, all four batches (the same path, so the same canonical SVD signs)
    single = injected(copy.deepcopy(model))
    lk.lora_ga_init(single, batches, loss_fn, r=2, alpha=8, target_modules=TARGETS)
    expected = _whole(single)
    for key, want in expected.items():
        for res in (r0, r1):
            torch.testing.assert_close(res["ga"][key], want, **close_small_k(), msg=f"FSDP2 {key}")
            torch.testing.assert_close(res["dp"][key], want, **close_small_k(), msg=f"data parallel {key}")
        torch.testing.assert_close(r0["ga"][key], r1["ga"][key], atol=0, rtol=0)  # replicated factors: identical
    for n in TARGETS:
        torch.testing.assert_close(r0["record"][n][0], expected[f"{n}.lora_A"], **close_small_k())
        torch.testing.assert_close(r0["record"][n][1], expected[f"{n}.lora_B"], **close_small_k())
    with torch.no_grad():
        torch.testing.assert_close(r0["out"], model(batches[0][0]), atol=2e-6, rtol=1e-5)  # function unchanged

    # PiSSA: the exact SVD on one process; the sharded randomized one agrees to its accuracy
    pm = injected(_spectral(copy.deepcopy(model)), r=3, alpha=3)
    for layer in lk.lora_layers(pm).values():
        lk.pissa_init(layer)  # exact
    for n, layer in lk.lora_layers(pm).items():
        got = r0["pissa"]
        ba = got[f"{n}.lora_B"] @ got[f"{n}.lora_A"]
        torch.testing.assert_close(ba, (layer.lora_B @ layer.lora_A).detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[f"{n}.weight"], layer.weight.detach(), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[f"{n}.lora_A"].abs(), layer.lora_A.detach().abs(), atol=1e-4, rtol=0)

    for tag, cls, words in [
        ("ga_bad_r", "ValueError", ["keeps its rank", "rank 1"]),
        ("pissa_no_niter", "ValueError", ["needs niter"]),
    ]:
        e0, e1 = torch.load(tmp_path / f"{tag}_rank0.pt"), torch.load(tmp_path / f"{tag}_rank1.pt")
        assert e0 == e1 and e0[0] == cls and all(w in e0[1] for w in words), (tag, e0, e1)

    # memory: row-block accumulators for every layer (model_grad / WORLD) plus transients of about one layer each
    # (that layer's whole gradient before the reduction, gloo's reduction buffer, FSDP's all-gathered weight and its
    # prefetch, the SVD's copies of one row block): measured 8 + 4.06 MiB. Accumulating whole gradients (what PEFT's
    # LoRA-GA holds) would need at least the model's 16 MiB.
    if r0["peak"] is None:
        pytest.skip("peak memory is not measurable here (/proc/self/clear_refs not writable)")
    layer_bytes = MEM_DIM * MEM_DIM * 4
    model_grad = MEM_LAYERS * layer_bytes
    for res in (r0, r1):
        assert res["peak"] < model_grad // WORLD + 6 * layer_bytes < model_grad, (res["peak"], model_grad)
