"""PEFT-format adapter files: save_adapter / load_adapter (lora_kernels/adapter_files.py)."""

import copy
import json
import math
import os

import pytest
import torch
import torch.nn as nn
from _models import assert_same_state, snapshot
from _tolerances import close_small_k
from safetensors.torch import load_file, save_file

import lora_kernels as lk


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(12, 12)
        self.v_proj = nn.Linear(12, 12, bias=False)
        self.o_proj = nn.Linear(12, 10)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.out = nn.Linear(10, 4)

    def forward(self, x):
        h = x
        for blk in self.layers:
            h = torch.tanh(blk.q_proj(h)) + blk.v_proj(h)
            h = torch.tanh(blk.o_proj(h))
            h = nn.functional.pad(h, (0, 2))
        return self.out(h[..., :10])


def fresh(seed=0):
    torch.manual_seed(seed)
    return Net()


def randomize_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)


X = torch.randn(5, 12, generator=torch.Generator().manual_seed(9))


def test_save_writes_peft_keys_and_config(tmp_path):
    model = fresh()
    lk.inject_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, dropout=0.1, backend="torch")
    randomize_adapters(model)
    cfg = lk.save_adapter(model, tmp_path, base_model_name_or_path="my/base")
    tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    expected = {
        f"base_model.model.layers.{i}.{m}.lora_{ab}.weight"
        for i in range(2)
        for m in ("q_proj", "v_proj")
        for ab in "AB"
    }
    assert set(tensors) == expected
    assert tensors["base_model.model.layers.0.q_proj.lora_A.weight"].shape == (4, 12)
    assert tensors["base_model.model.layers.1.v_proj.lora_B.weight"].shape == (12, 4)
    torch.testing.assert_close(
        tensors["base_model.model.layers.1.v_proj.lora_B.weight"], model.layers[1].v_proj.lora_B.detach()
    )
    with open(os.path.join(tmp_path, "adapter_config.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(cfg))
    assert on_disk["peft_type"] == "LORA" and on_disk["task_type"] is None
    assert on_disk["r"] == 4 and on_disk["lora_alpha"] == 8 and on_disk["lora_dropout"] == pytest.approx(0.1)
    assert on_disk["target_modules"] == ["q_proj", "v_proj"]
    assert on_disk["use_rslora"] is False and on_disk["bias"] == "none" and on_disk["fan_in_fan_out"] is False
    assert on_disk["base_model_name_or_path"] == "my/base" and on_disk["inference_mode"] is True
    assert on_disk["rank_pattern"] == {} and on_disk["alpha_pattern"] == {}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.parametrize("use_rslora", [False, True])
def test_round_trip_into_fresh_model_and_into_existing_layers(tmp_path, use_rslora):
    model = fresh()
    lk.inject_lora(model, ["q_proj", "o_proj"], r=3, alpha=5, use_rslora=use_rslora, backend="torch")
    randomize_adapters(model)
    with torch.no_grad():
        y = model(X)
    lk.save_adapter(model, tmp_path)

    other = fresh()  # same base weights, no adapter: load_adapter injects from the config
    loaded = lk.load_adapter(other, tmp_path, backend="torch")
    assert sorted(loaded) == sorted(lk.lora_layers(model))
    with torch.no_grad():
        torch.testing.assert_close(other(X), y, atol=1e-6, rtol=1e-6)
    assert other.layers[0].q_proj.scaling == pytest.approx(model.layers[0].q_proj.scaling)

    third = fresh()  # existing layers with other alpha: they take the file's
    lk.inject_lora(third, ["q_proj", "o_proj"], r=3, alpha=1, use_rslora=not use_rslora, backend="torch")
    lk.load_adapter(third, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(third(X), y, atol=1e-6, rtol=1e-6)


def test_mixed_ranks_use_rank_and_alpha_patterns(tmp_path):
    model = fresh()
    lk.inject_lora(model, ["q_proj"], r=4, alpha=8, backend="torch")
    lk.inject_lora(model, ["layers.1.o_proj"], r=2, alpha=3, backend="torch", freeze_base=False)
    randomize_adapters(model)
    with torch.no_grad():
        y = model(X)
    cfg = lk.save_adapter(model, tmp_path)
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {"layers.1.o_proj": 2}
    assert cfg["alpha_pattern"] == {"layers.1.o_proj": 3}
    # o_proj of layer 0 is not adapted, so the short name "o_proj" would select too much: full names instead
    assert sorted(cfg["target_modules"]) == ["layers.0.q_proj", "layers.1.o_proj", "layers.1.q_proj"]
    other = fresh()
    lk.load_adapter(other, tmp_path, backend="torch")
    assert other.layers[1].o_proj.r == 2 and not isinstance(other.layers[0].o_proj, lk.LoRALinear)
    with torch.no_grad():
        torch.testing.assert_close(other(X), y, atol=1e-6, rtol=1e-6)


def _train_a_bit(model, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        x = torch.randn(8, 12, generator=gen)
        loss = (model(x) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("init", ["lora-ga", "pissa"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_mutated_base_saved_as_rank_2r_against_original(tmp_path, init, use_rslora):
    model = fresh()
    original = copy.deepcopy(model)
    if init == "lora-ga":
        gen = torch.Generator().manual_seed(3)
        batches = [torch.randn(8, 12, generator=gen) for _ in range(2)]
        lk.lora_ga_init(
            model,
            batches,
            lambda m, b: (m(b) ** 2).mean(),
            r=2,
            alpha=4,
            use_rslora=use_rslora,
            target_modules=["q_proj", "v_proj"],
            backend="torch",
        )
    else:
        lk.inject_lora(model, ["q_proj", "v_proj"], r=2, alpha=4, use_rslora=use_rslora, init="pissa", backend="torch")
    assert not torch.equal(model.layers[0].q_proj.weight, original.layers[0].q_proj.weight)  # W0 was mutated
    _train_a_bit(model)
    with torch.no_grad():
        y = model(X)

    cfg = lk.save_adapter(model, tmp_path / "converted")
    assert cfg["r"] == 4 and cfg["lora_alpha"] == pytest.approx(4 * (math.sqrt(2) if use_rslora else 2))
    target = copy.deepcopy(original)  # the ORIGINAL base, as PEFT users have it
    lk.load_adapter(target, tmp_path / "converted", backend="torch")
    assert target.layers[0].q_proj.scaling == pytest.approx(model.layers[0].q_proj.scaling)
    with torch.no_grad():
        torch.testing.assert_close(target(X), y, **close_small_k())

    cfg_raw = lk.save_adapter(model, tmp_path / "raw", convert_to_original=False)
    assert cfg_raw["r"] == 2
    with open(tmp_path / "raw" / "adapter_model.safetensors", "rb") as f:
        header = f.read(400)
    assert b'"lora_kernels.base":"mutated"' in header
    residual = copy.deepcopy(model)
    for layer in lk.lora_layers(residual).values():
        layer.reset_lora_parameters("zeros")
    lk.load_adapter(residual, tmp_path / "raw")
    with torch.no_grad():
        torch.testing.assert_close(residual(X), y, atol=1e-6, rtol=1e-6)
    with pytest.warns(UserWarning, match="convert_to_original=False"):  # on the original base: wrong, and said so
        lk.load_adapter(copy.deepcopy(original), tmp_path / "raw")


def test_missing_and_unexpected_keys_are_listed_and_nothing_changes(tmp_path):
    model = fresh()
    lk.inject_lora(model, ["q_proj", "v_proj"], r=2, alpha=2, backend="torch")
    randomize_adapters(model)
    lk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.layers.1.v_proj.lora_B.weight"]
    tensors["base_model.model.layers.0.k_proj.lora_A.weight"] = torch.zeros(2, 12)
    save_file(tensors, path)

    target = fresh()
    lk.inject_lora(target, ["q_proj", "v_proj"], r=2, alpha=2, backend="torch")
    snap = snapshot(target)
    with pytest.raises(ValueError) as err:
        lk.load_adapter(target, tmp_path)
    msg = str(err.value)
    assert "missing keys (1): ['base_model.model.layers.1.v_proj.lora_B.weight']" in msg
    assert "unexpected keys (1): ['base_model.model.layers.0.k_proj.lora_A.weight']" in msg
    assert_same_state(target, snap)
    plain = fresh()
    snap_plain = snapshot(plain)
    with pytest.raises(ValueError, match="missing keys"):
        lk.load_adapter(plain, tmp_path)
    assert_same_state(plain, snap_plain)
    assert not lk.lora_layers(plain)  # no layer was injected by the failed load


def test_shape_and_rank_mismatches_name_the_layer(tmp_path):
    model = fresh()
    lk.inject_lora(model, ["q_proj"], r=2, alpha=2, backend="torch")
    lk.save_adapter(model, tmp_path)
    target = fresh()
    lk.inject_lora(target, ["q_proj"], r=3, alpha=2, backend="torch")
    snap = snapshot(target)
    with pytest.raises(ValueError, match=r"layers.0.q_proj: the model's layer has r=3, the file r=2"):
        lk.load_adapter(target, tmp_path)
    assert_same_state(target, snap)
    # a tensor of the wrong width
    wpath = tmp_path / "adapter_model.safetensors"
    tensors = load_file(wpath)
    tensors["base_model.model.layers.1.q_proj.lora_A.weight"] = torch.zeros(2, 11)
    save_file(tensors, wpath)
    plain = fresh()
    with pytest.raises(ValueError, match=r"layers.1.q_proj: expected lora_A \(2, 12\) .* file has \(2, 11\)"):
        lk.load_adapter(plain, tmp_path)
    assert not lk.lora_layers(plain)
    # a config whose r disagrees with the tensors
    cfg_path = tmp_path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 5
    cfg_path.write_text(json.dumps(cfg))
    plain = fresh()
    with pytest.raises(ValueError, match=r"r=5 from the config"):
        lk.load_adapter(plain, tmp_path)
    assert not lk.lora_layers(plain)


def test_corrupt_or_truncated_files_raise_and_never_half_load(tmp_path):
    model = fresh()
    lk.inject_lora(model, ["q_proj", "v_proj", "o_proj"], r=2, alpha=2, backend="torch")
    randomize_adapters(model)
    lk.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    blob = path.read_bytes()
    target = fresh()
    lk.inject_lora(target, ["q_proj", "v_proj", "o_proj"], r=2, alpha=2, backend="torch")
    snap = snapshot(target)
    for bad in (blob[: len(blob) - 17], blob[:5], b"\x00" * 64, b"not a safetensors file at all"):
        path.write_bytes(bad)
        with pytest.raises(ValueError, match="truncated or corrupt"):
            lk.load_adapter(target, tmp_path)
        assert_same_state(target, snap)
    path.write_bytes(blob)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        lk.load_adapter(target, tmp_path)
    assert_same_state(target, snap)
    # NaN in the file: refused before anything is copied
    tensors = load_file(path)
    tensors["base_model.model.layers.1.o_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(tensors, path)
    lk.save_adapter(model, tmp_path / "ok")
    (tmp_path / "adapter_config.json").write_text((tmp_path / "ok" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="inf or NaN"):
        lk.load_adapter(target, tmp_path)
    assert_same_state(target, snap)
    with pytest.raises(FileNotFoundError):
        lk.load_adapter(target, tmp_path / "nowhere")


def test_peft_written_file_loads(tmp_path):
    """A directory as PEFT 0.21 writes it (hand-made here: peft is not installed): extra config fields, string
    target_modules regex, default adapter keys."""
    base = fresh()
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        tensors[f"base_model.model.layers.{i}.v_proj.lora_A.weight"] = torch.randn(8, 12, generator=gen)
        tensors[f"base_model.model.layers.{i}.v_proj.lora_B.weight"] = torch.randn(12, 8, generator=gen)
    save_file(tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": "toy",
        "bias": "none",
        "corda_config": None,
        "eva_config": None,
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": 16,
        "lora_bias": False,
        "lora_dropout": 0.05,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": 8,
        "rank_pattern": {},
        "revision": None,
        "target_modules": r".*\.v_proj",
        "task_type": None,
        "trainable_token_indices": None,
        "use_dora": False,
        "use_rslora": False,
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    ref = copy.deepcopy(base)
    lk.load_adapter(base, tmp_path, backend="torch")
    layer = base.layers[1].v_proj
    assert isinstance(layer, lk.LoRALinear) and layer.r == 8 and layer.scaling == pytest.approx(2.0)
    assert layer.dropout == pytest.approx(0.05)
    W = (
        ref.layers[1].v_proj.weight
        + 2.0
        * tensors["base_model.model.layers.1.v_proj.lora_B.weight"]
        @ tensors["base_model.model.layers.1.v_proj.lora_A.weight"]
    )
    torch.testing.assert_close(layer.weight + layer.delta_weight(), W.detach(), **close_small_k())
    for field, value in (("use_dora", True), ("fan_in_fan_out", True), ("peft_type", "IA3")):
        bad = dict(cfg, **{field: value})
        (tmp_path / "adapter_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=field if field != "peft_type" else "LORA"):
            lk.load_adapter(fresh(), tmp_path)


def test_save_refuses_merged_and_empty(tmp_path):
    with pytest.raises(ValueError, match="no LoRALinear"):
        lk.save_adapter(fresh(), tmp_path)
    model = fresh()
    lk.inject_lora(model, ["q_proj"], r=2, backend="torch")
    model.layers[0].q_proj.merge()
    with pytest.raises(ValueError, match="merged"):
        lk.save_adapter(model, tmp_path)
