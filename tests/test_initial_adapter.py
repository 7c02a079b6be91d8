"""The initial adapter that PiSSA / LoRA-GA record on a layer (``LoRALinear.initial_adapter``): kept by
``state_dict`` round trips, deepcopy and pickling, absent from the state dict of a layer without one, and
tolerated missing in older checkpoints."""

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels.init.pissa import INIT_RECORD
from lora_kernels.modules import INITIAL_ADAPTER_KEYS

TARGETS = ["up", "mid"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 16)
        self.mid = nn.Linear(16, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.up(x)))))


def base(seed=0):
    torch.manual_seed(seed)
    return Net()


def pissa_model(seed=0):
    model = base(seed)
    lk.inject_lora(model, TARGETS, r=3, alpha=6, init="pissa", backend="torch")
    return model


def lora_ga_model(seed=0):
    model = base(seed)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 12, generator=gen), torch.randn(8, 3, generator=gen)) for _ in range(3)]
    lk.lora_ga_init(
        model,
        batches,
        lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(),
        r=2,
        alpha=4,
        target_modules=TARGETS,
        backend="torch",
    )
    return model


def fresh(seed=1):
    """The same injected structure, another base and no record."""
    model = base(seed)
    lk.inject_lora(model, TARGETS, r=3, alpha=6, backend="torch")
    return model


def records(model):
    return {n: layer.initial_adapter for n, layer in lk.lora_layers(model).items()}


def assert_same_records(got, want):
    assert got.keys() == want.keys()
    for n in want:
        assert (got[n] is None) == (want[n] is None), n
        if want[n] is not None:
            for g, w in zip(got[n], want[n]):
                assert g.dtype == torch.float32 and g.device.type == "cpu"
                torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("make", [pissa_model, lora_ga_model], ids=["pissa", "lora_ga"])
def test_the_record_survives_a_state_dict_round_trip(make):
    model = make()
    want = records(model)
    assert all(v is not None for v in want.values())
    sd = model.state_dict()
    for n in TARGETS:
        for k in INITIAL_ADAPTER_KEYS:
            assert f"{n}.{k}" in sd
    layer = lk.lora_layers(model)["up"]
    target = base(1)  # the same structure and settings (not in the state dict), another base
    lk.inject_lora(target, TARGETS, r=layer.r, alpha=layer.alpha, use_rslora=layer.use_rslora, backend="torch")
    assert all(v is None for v in records(target).values())
    result = target.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert_same_records(records(target), want)
    x = torch.randn(5, 12)
    torch.testing.assert_close(target(x), model(x), rtol=0, atol=0)


def test_the_record_survives_through_a_file_and_into_a_merged_layer():
    model = pissa_model()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    target = fresh()
    for layer in lk.lora_layers(target).values():
        layer.merge()
    target.load_state_dict(torch.load(buf, weights_only=True))
    assert_same_records(records(target), records(model))
    assert all(layer.merged for layer in lk.lora_layers(target).values())


def test_the_record_survives_deepcopy_and_pickling():
    model = pissa_model()
    want = records(model)
    assert_same_records(records(copy.deepcopy(model)), want)
    assert_same_records(records(pickle.loads(pickle.dumps(model))), want)


def test_a_layer_without_a_record_has_the_state_dict_it_always_had():
    model = fresh()
    assert set(model.state_dict()) == {f"{n}.{p}" for n in TARGETS for p in ("weight", "bias", "lora_A", "lora_B")} | {
        "head.weight",
        "head.bias",
    }
    # lora_state_dict (and the adapter files built on it) never carry the record
    assert set(lk.lora_state_dict(pissa_model())) == {f"{n}.{p}" for n in TARGETS for p in ("lora_A", "lora_B")}


def test_older_checkpoints_without_the_record_load_strictly():
    old = {k: v for k, v in pissa_model().state_dict().items() if not k.endswith(INITIAL_ADAPTER_KEYS)}
    target = fresh()
    result = target.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(v is None for v in records(target).values())
    # into a layer that has a record, a checkpoint without one leaves it as it is
    with_record = pissa_model(seed=3)
    before = records(with_record)
    with_record.load_state_dict(old, strict=True)
    assert_same_records(records(with_record), before)


def test_a_half_record_or_a_wrong_shape_is_an_error():
    sd = pissa_model().state_dict()
    half = {k: v for k, v in sd.items() if k != f"up.{INITIAL_ADAPTER_KEYS[1]}"}
    with pytest.raises(RuntimeError, match="initial adapter"):
        fresh().load_state_dict(half)
    bad = dict(sd)
    bad[f"up.{INITIAL_ADAPTER_KEYS[0]}"] = torch.zeros(2, 12)
    with pytest.raises(RuntimeError, match=r"up\.initial_adapter_A: expected a floating tensor of shape \(3, 12\)"):
        fresh().load_state_dict(bad)


def test_the_record_stays_fp32_on_the_cpu_across_to_and_is_cleared_by_reset_parameters():
    model = pissa_model()
    want = records(model)
    model.to(torch.float64)
    assert_same_records(records(model), want)
    layer = lk.lora_layers(model)["up"]
    assert layer.initial_adapter is getattr(layer, INIT_RECORD)  # the accessor reads what save_adapter reads
    # reset_parameters() draws a new W0: the record of the old one goes (and comes back only with init="pissa")
    layer = lk.LoRALinear.from_linear(nn.Linear(12, 16), r=3, init="zeros", backend="torch")
    lk.pissa_init(layer)
    assert layer.initial_adapter is not None
    layer.reset_parameters()
    assert layer.initial_adapter is None
    assert not any(k.startswith("initial") for k in layer.state_dict())
