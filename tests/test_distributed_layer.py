"""The low-level part of lora_kernels.distributed on one process: finding LoRA layers by their attributes, and the
collective save / load / merge taking the single-process steps as arguments (without torch.distributed running, the
verdict exchange simply re-raises a rank's own error)."""

import pytest
import torch
import torch.nn as nn

import lora_kernels as lk
from lora_kernels import distributed


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(6, 5)
        self.k = nn.Linear(6, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.q(x) + self.k(x))


def model_with_adapters():
    torch.manual_seed(0)
    model = Block()
    lk.inject_lora(model, ["q", "k"], r=2, alpha=4, backend="torch")
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.normal_()
    return model


def test_lora_layers_of_finds_what_lora_layers_finds():
    model = model_with_adapters()
    assert distributed.lora_layers_of(model) == lk.lora_layers(model)
    assert distributed.lora_layers_of(Block()) == {}
    # A predicate narrows the search.
    assert list(distributed.lora_layers_of(model, lambda m: m is model.k)) == ["k"]
    # Multi-adapter layers and plain modules are not LoRA layers.
    multi = Block()
    lk.inject_multi_lora(multi, ["q"], max_adapters=2, max_rank=2, backend="torch")
    assert distributed.lora_layers_of(multi) == {} == lk.lora_layers(multi)
    assert not distributed.is_lora_layer(nn.Linear(2, 2)) and not distributed.is_lora_layer(torch.zeros(2))


def test_lora_layers_of_agrees_on_peft_models():
    peft = pytest.importorskip("peft")
    base = Block()
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "k"]))
    assert distributed.lora_layers_of(pm) == {} == lk.lora_layers(pm)  # PEFT's own layers: lora_A is a ModuleDict
    lk.from_peft(pm, backend="torch")
    found = distributed.lora_layers_of(pm)
    assert found == lk.lora_layers(pm) and len(found) == 2  # the converted layers are LoRALinear


def test_merge_layer_uses_the_layers_rule_and_unmerges_bit_for_bit():
    model = model_with_adapters()
    ref = model_with_adapters()
    layer, ref_layer = model.q, ref.q
    w0 = layer.weight.detach().clone()
    distributed.merge_layer(layer, layer._merged_weight)
    ref_layer.merge()
    assert layer.merged and torch.equal(layer.weight, ref_layer.weight)
    distributed.unmerge_layer(layer)
    assert not layer.merged and torch.equal(layer.weight, w0)
    distributed.merge_layer(layer)  # the layer's own rule by default
    assert layer.merged and torch.equal(layer.weight, ref_layer.weight)
    distributed.unmerge_layer(layer)

    def refusing(w0, lora_A, lora_B):
        raise ValueError("merge refused: test")

    with pytest.raises(ValueError, match="merge refused: test"):
        distributed.merge_layer(layer, refusing)
    assert not layer.merged and torch.equal(layer.weight, w0)


def test_collective_save_checks_first_and_saves_whole_tensors():
    model = model_with_adapters()
    calls = []

    def bad_check():
        raise TypeError("save_adapter: path must be a str")

    with pytest.raises(TypeError, match="path must be a str"):
        distributed.collective_save(model, bad_check, lambda: calls.append("saved"))
    assert calls == []

    def save():
        # Inside, the dispatch is off and the layers hold plain whole copies of their adapters.
        assert not distributed.is_sharded(model)
        return {n: l.lora_B.detach().clone() for n, l in lk.lora_layers(model).items()}

    got = distributed.collective_save(model, lambda: lk.lora_layers(model), save, same={"x": 1})
    for n, layer in lk.lora_layers(model).items():
        assert torch.equal(got[n], layer.lora_B.detach())

    def failing_save():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        distributed.collective_save(model, lambda: lk.lora_layers(model), failing_save)


@pytest.mark.parametrize("from_current", [True, False])
def test_collective_load_changes_nothing_when_the_load_fails(from_current):
    model = model_with_adapters()
    layers = lk.lora_layers(model)
    before = {k: v.clone() for k, v in lk.lora_state_dict(model).items()}
    settings = {n: (l.alpha, l.use_rslora, l.dropout, l.scaling) for n, l in layers.items()}

    def failing_load():
        for layer in lk.lora_layers(model).values():  # a load that changed settings, then found a problem
            layer.alpha, layer.scaling = 99.0, 99.0
            with torch.no_grad():
                layer.lora_A.fill_(7.0)
        raise ValueError("load_adapter: nothing was loaded: test")

    with pytest.raises(ValueError, match="nothing was loaded: test"):
        distributed.collective_load(model, lambda: layers, failing_load, from_current=from_current)
    for k, v in lk.lora_state_dict(model).items():
        assert torch.equal(v, before[k]), k
    assert {n: (l.alpha, l.use_rslora, l.dropout, l.scaling) for n, l in layers.items()} == settings

    def load():
        for layer in lk.lora_layers(model).values():
            with torch.no_grad():
                layer.lora_B.add_(1.0)  # from the current values, or from zeros
        return "done"

    assert distributed.collective_load(model, lambda: layers, load, from_current=from_current) == "done"
    for k, v in lk.lora_state_dict(model).items():
        start = before[k] if from_current else torch.zeros_like(v)
        assert torch.equal(v, start + 1 if k.endswith("lora_B") else start), k


def test_load_lora_state_dict_takes_the_single_process_loader():
    model = model_with_adapters()
    sd = {k: v * 3 for k, v in lk.lora_state_dict(model).items()}
    res = distributed.load_lora_state_dict(model, sd, load=lk.load_lora_state_dict)
    assert res.missing_keys == [] and res.unexpected_keys == []
    for k, v in lk.lora_state_dict(model).items():
        assert torch.equal(v, sd[k]), k
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        distributed.load_lora_state_dict(model, [1], load=lk.load_lora_state_dict)
