"""save_adapter / load_adapter under careless and hostile use: pattern keys that match one layer only, refusals at the
call that leave the model as it was, clear errors, nothing left on disk by a failed save."""

import copy
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from _models import assert_same_state, nested, snapshot
from safetensors.torch import load_file, save_file

import lora_kernels as lk
from lora_kernels import adapter_files as lk_io


def randomize(model, seed=1, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * scale)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * scale)


def nested_with_mixed_adapters():
    """Every layer adapted, with an r and alpha that only a pattern key matching that layer alone gives back."""
    model = nested()
    lk.inject_lora(model, r"attn\.q", r=3, alpha=5, backend="torch")
    lk.inject_lora(model, r"block\.attn\.q", r=2, alpha=2, backend="torch")
    lk.inject_lora(model, r"attn\.q2", r=2, alpha=7, backend="torch")
    lk.inject_lora(model, r"block\.attn\.q2", r=2, alpha=2, backend="torch")
    randomize(model)
    return model


def layer_numbers(model):
    return {n: (m.r, m.alpha, m.scaling) for n, m in lk.lora_layers(model).items()}


X = torch.randn(4, 6, generator=torch.Generator().manual_seed(9))


# ------------------------------------------------------------------------------------------ patterns
def test_pattern_keys_select_exactly_one_layer_and_round_trip(tmp_path):
    model = nested_with_mixed_adapters()
    cfg = lk.save_adapter(model, tmp_path)
    # "attn.q" would also match "block.attn.q" (suffix) and, unanchored, "attn.q2" (prefix): anchored keys instead.
    assert cfg["r"] == 2 and cfg["lora_alpha"] == 2
    assert cfg["rank_pattern"] == {r"^attn\.q": 3}
    assert cfg["alpha_pattern"] == {r"^attn\.q": 5, r"^attn\.q2": 7}
    for key in list(cfg["rank_pattern"]) + list(cfg["alpha_pattern"]):
        names = [n for n, _ in model.named_modules() if lk_io.pattern_matches(key, n)]
        assert len(names) == 1, (key, names)
    loaded = nested()
    lk.load_adapter(loaded, tmp_path, backend="torch")
    assert layer_numbers(loaded) == layer_numbers(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X), rtol=1e-6, atol=1e-6)
    # ... and into existing layers of the same shapes (alpha is taken from the file, per layer)
    again = nested_with_mixed_adapters()
    for layer in lk.lora_layers(again).values():
        layer.alpha, layer.scaling = 1.0, 1.0 / layer.r
    lk.load_adapter(again, tmp_path)
    assert layer_numbers(again) == layer_numbers(model)


def test_unambiguous_pattern_keys_stay_plain_names(tmp_path):
    model = nested()
    lk.inject_lora(model, r"block\.attn\.q2?", r=2, alpha=2, backend="torch")
    layer = model.block.attn.q2
    layer.alpha, layer.scaling = 6.0, 3.0
    cfg = lk.save_adapter(model, tmp_path)
    assert cfg["alpha_pattern"] == {"block.attn.q2": 6}


def test_pattern_key_is_anchored_at_the_end_of_the_name(tmp_path):
    """A key that is a prefix of another layer's name ("attn.q" of "attn.q2") gives its value to that layer only."""
    model = nested()
    lk.inject_lora(model, r"attn\.q2?", r=2, alpha=2, backend="torch")
    randomize(model)
    lk.save_adapter(model, tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    raw["alpha_pattern"] = {"attn.q": 10}  # hand-written (plain) key, as PEFT users write them
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    loaded = nested()
    lk.load_adapter(loaded, tmp_path, backend="torch")
    assert loaded.attn.q.alpha == 10 and loaded.attn.q2.alpha == 2


def test_target_modules_written_select_only_the_adapted_layers(tmp_path):
    # Only the top-level attn.q / attn.q2 are adapted: neither short names nor full names (suffix rule) select
    # exactly them, so the file says it with a regex PEFT matches against the whole name.
    model = nested()
    lk.inject_lora(model, r"attn\.q2?", r=2, alpha=4, backend="torch")
    randomize(model)
    cfg = lk.save_adapter(model, tmp_path)
    assert isinstance(cfg["target_modules"], str)
    loaded = nested()
    lk.load_adapter(loaded, tmp_path, backend="torch")
    assert sorted(lk.lora_layers(loaded)) == ["attn.q", "attn.q2"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), model(X))


# ------------------------------------------------------------------------------------------ modes
def test_load_into_fresh_eval_model_keeps_eval_mode(tmp_path):
    model = nested()
    lk.inject_lora(model, r".*q", r=2, alpha=2, dropout=0.5, backend="torch")
    randomize(model)
    lk.save_adapter(model, tmp_path)
    target = nested().eval()
    lk.load_adapter(target, tmp_path, backend="torch")
    assert all(not m.training for m in lk.lora_layers(target).values())
    with torch.no_grad():  # no dropout at inference: deterministic, and the adapter fully applied
        y1, y2 = target(X), target(X)
        model.eval()
        torch.testing.assert_close(y1, model(X))
    assert torch.equal(y1, y2)
    train_target = nested().train()
    lk.load_adapter(train_target, tmp_path, backend="torch")
    assert all(m.training for m in lk.lora_layers(train_target).values())


def test_from_linear_copies_eval_mode():
    lin = nn.Linear(6, 6).eval()
    layer = lk.LoRALinear.from_linear(lin, r=2, dropout=0.5, backend="torch")
    assert not layer.training


# ------------------------------------------------------------------------------------------ refusals
class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6).half()
        self.b = nn.Linear(6, 6)


def test_lora_dtype_valid_for_one_layer_only_changes_nothing(tmp_path):
    src = Mixed()
    lk.inject_lora(src, ["a", "b"], r=2, lora_dtype=torch.float32, backend="torch")
    lk.save_adapter(src, tmp_path)
    target = Mixed()
    snap = snapshot(target)
    flags = [p.requires_grad for p in target.parameters()]
    # float16 is the adapter dtype of "a" (its base dtype) but not allowed for "b" (float32 base)
    with pytest.raises(ValueError, match=r"b: lora_dtype must be the base weight's dtype"):
        lk.load_adapter(target, tmp_path, lora_dtype=torch.float16)
    assert not lk.lora_layers(target)
    assert_same_state(target, snap)
    assert [p.requires_grad for p in target.parameters()] == flags
    with pytest.raises(TypeError, match="lora_dtype"):
        lk.load_adapter(target, tmp_path, lora_dtype="float16")
    lk.load_adapter(target, tmp_path, lora_dtype=torch.float32)
    assert target.a.lora_A.dtype == torch.float32
    # existing layers keep their dtype: another lora_dtype is refused, not ignored
    with pytest.raises(ValueError, match="existing layers keep their dtype"):
        lk.load_adapter(target, tmp_path, lora_dtype=torch.float16)


@pytest.mark.parametrize("into", ["fresh", "existing"])
def test_values_overflowing_the_model_dtype_are_refused(tmp_path, into):
    src = nested()
    lk.inject_lora(src, r".*q", r=2, alpha=2, backend="torch")
    randomize(src)
    with torch.no_grad():
        src.block.attn.q.lora_B[0, 0] = 1e5  # finite in float32, inf in float16 (max 65504)
    lk.save_adapter(src, tmp_path)
    target = nested().half()
    if into == "existing":
        lk.inject_lora(target, r".*q", r=2, alpha=2, backend="torch")
    snap = snapshot(target)
    with pytest.raises(
        ValueError,
        match=r"block\.attn\.q: the file's values overflow the adapter's dtype "
        r"torch\.float16",
    ):
        lk.load_adapter(target, tmp_path)
    assert_same_state(target, snap)
    assert len(lk.lora_layers(target)) == (2 if into == "existing" else 0)
    # an fp32 adapter holds the value: loads
    target = nested().half()
    lk.load_adapter(target, tmp_path, lora_dtype=torch.float32)
    assert target.block.attn.q.lora_B[0, 0].item() == 1e5


class WithMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)
        self.proj = nn.Linear(8, 8)


def test_multihead_attention_out_proj_refused(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for n in ("mha.out_proj", "proj"):
        tensors[f"base_model.model.{n}.lora_A.weight"] = torch.randn(2, 8, generator=gen)
        tensors[f"base_model.model.{n}.lora_B.weight"] = torch.randn(8, 2, generator=gen)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["out_proj", "proj"]})
    )
    model = WithMHA()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"mha\.out_proj: nn\.MultiheadAttention"):
        lk.load_adapter(model, tmp_path)
    assert not lk.lora_layers(model)
    assert_same_state(model, snap)


def saved_nested(tmp_path):
    model = nested()
    lk.inject_lora(model, r".*q", r=2, alpha=2, backend="torch")
    randomize(model)
    lk.save_adapter(model, tmp_path)
    return model


def with_config(tmp_path, **changes):
    path = tmp_path / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))  # json writes NaN / Infinity as Python's json reads them back


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("lora_alpha", float("nan"), "lora_alpha"),
        ("lora_alpha", float("inf"), "lora_alpha"),
        ("lora_dropout", 1.5, "lora_dropout"),
        ("lora_dropout", -0.5, "lora_dropout"),
        ("lora_dropout", float("nan"), "lora_dropout"),
        ("lora_dropout", "abc", "lora_dropout"),
        ("lora_dropout", True, "lora_dropout"),
        ("use_rslora", "false", "use_rslora"),
        ("use_rslora", 1, "use_rslora"),
        ("alpha_pattern", {"attn.q": float("inf")}, "alpha_pattern"),
        ("alpha_pattern", {"attn.(q": 3}, r"alpha_pattern key 'attn.\(q' is not a valid regex"),
        ("rank_pattern", {"[": 2}, r"rank_pattern key '\[' is not a valid regex"),
        ("target_modules", "(q", r"target_modules='\(q' is not a valid regex"),
    ],
)
@pytest.mark.parametrize("into", ["fresh", "existing"])
def test_bad_config_values_refused_at_the_call(tmp_path, key, value, match, into):
    src = saved_nested(tmp_path)
    with_config(tmp_path, **{key: value})
    target = nested()
    if into == "existing":
        lk.inject_lora(target, r".*q", r=2, alpha=2, backend="torch")
    snap, numbers = snapshot(target), layer_numbers(target)
    with pytest.raises(ValueError, match=match):
        lk.load_adapter(target, tmp_path)
    assert_same_state(target, snap)
    assert layer_numbers(target) == numbers
    assert [m.dropout for m in lk.lora_layers(target).values()] == [0.0] * len(numbers)
    del src


def test_bad_backend_refused_at_the_call(tmp_path):
    saved_nested(tmp_path)
    target = nested()
    with pytest.raises(ValueError, match="backend='bogus' is not a backend"):
        lk.load_adapter(target, tmp_path, backend="bogus")
    assert not lk.lora_layers(target)


def test_fp8_adapter_tensors_get_a_clear_type_error(tmp_path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8 dtype")
    saved_nested(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.attn.q.lora_A.weight"
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, path)
    target = nested()
    with pytest.raises(
        TypeError,
        match=r"must be one of torch\.float16, torch\.bfloat16, torch\.float32, "
        r"torch\.float64; got base_model\.model\.attn\.q\.lora_A\.weight "
        r"\(torch\.float8_e4m3fn\)",
    ):
        lk.load_adapter(target, tmp_path)
    assert not lk.lora_layers(target)


# ------------------------------------------------------------------------------------------ saving
def test_base_model_path_like_is_written_as_str(tmp_path):
    model = saved_nested(tmp_path / "first")
    cfg = lk.save_adapter(model, tmp_path / "out", base_model_name_or_path=Path("models") / "base")
    assert cfg["base_model_name_or_path"] == os.path.join("models", "base")
    on_disk = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert on_disk["base_model_name_or_path"] == os.path.join("models", "base")
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(TypeError, match="base_model_name_or_path"):
        lk.save_adapter(model, tmp_path / "bad", base_model_name_or_path=3)
    assert not (tmp_path / "bad").exists()


def listing(root):
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
        out[os.path.relpath(dirpath, root) + "/"] = b""
    return out


@pytest.mark.parametrize("fail_in", ["weights", "config"])
def test_failed_save_leaves_the_directory_as_before(tmp_path, monkeypatch, fail_in):
    model = saved_nested(tmp_path / "old")
    import safetensors.torch

    real_save = safetensors.torch.save_file

    def failing_save(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)  # a partial file is on disk when the error comes
        raise OSError("disk full")

    def failing_text(path, text):
        with open(path, "w") as f:
            f.write(text[:10])
        raise OSError("disk full")

    if fail_in == "weights":
        monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    else:
        monkeypatch.setattr(lk_io, "_write_text", failing_text)
    before = listing(tmp_path)
    for target in (tmp_path / "old", tmp_path / "new" / "nested"):
        with pytest.raises(OSError, match="disk full"):
            lk.save_adapter(model, target)
        assert listing(tmp_path) == before


def save_other(path):
    """Save a second adapter (other weights and alpha, same layers) over ``path``; returns its model."""
    model = nested()
    lk.inject_lora(model, r".*q", r=2, alpha=3, backend="torch")
    randomize(model)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_B.add_(1.0)
    lk.save_adapter(model, path)
    return model


def pair_state(path):
    """(weights bytes, config bytes) under the final names; None for a file that is absent."""

    def read(name):
        p = os.path.join(path, name)
        return Path(p).read_bytes() if os.path.exists(p) else None

    return read("adapter_model.safetensors"), read("adapter_config.json")


@pytest.mark.parametrize("existing", [True, False])
def test_every_rename_of_a_save_can_fail_and_the_directory_stays_as_before(tmp_path, monkeypatch, existing):
    # Over an old adapter a save moves the two old files aside and renames the two new ones into place; a failure
    # at any of those steps (the config's rename, the last, included) leaves the old adapter whole: its weights are
    # never paired with the new config or the other way round.
    target = tmp_path / "adapter"
    if existing:
        old = saved_nested(target)
    before = listing(tmp_path)
    real_replace = os.replace
    n_calls = 4 if existing else 2  # (move the config aside, move the weights aside,) rename weights, rename config
    for fail_at in range(n_calls):
        count = [0]

        def failing(src, dst, fail_at=fail_at, count=count):
            count[0] += 1
            if count[0] == fail_at + 1:
                raise OSError(f"rename {fail_at} failed")
            return real_replace(src, dst)

        monkeypatch.setattr(os, "replace", failing)
        with pytest.raises(OSError, match=f"rename {fail_at} failed"):
            save_other(target)
        monkeypatch.setattr(os, "replace", real_replace)
        assert listing(tmp_path) == before, fail_at
    calls = []
    monkeypatch.setattr(os, "replace", lambda src, dst: (calls.append(dst), real_replace(src, dst)))
    save_other(target)  # every rename of a save was made to fail above
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(calls) == n_calls
    if existing:
        lk.save_adapter(old, target)
        loaded = nested()
        lk.load_adapter(loaded, target, backend="torch")
        with torch.no_grad():
            torch.testing.assert_close(loaded(X), old(X), rtol=0, atol=0)


def test_a_crash_between_the_renames_never_pairs_new_weights_with_an_old_config(tmp_path, monkeypatch):
    # A killed process runs no undo. At every point of a save over an old adapter, what the final names hold is the
    # old pair, the new pair, or no config at all (no adapter: a reader fails loudly instead of mixing the two).
    target = tmp_path / "adapter"
    saved_nested(target)
    old_pair = pair_state(target)
    states = [old_pair]
    real_replace = os.replace

    def recording(src, dst):
        real_replace(src, dst)
        states.append(pair_state(target))

    monkeypatch.setattr(os, "replace", recording)
    save_other(target)
    monkeypatch.setattr(os, "replace", real_replace)
    new_pair = states[-1]
    assert new_pair[0] != old_pair[0] and new_pair[1] != old_pair[1] and None not in new_pair
    assert len(states) >= 3
    for weights, config in states:
        assert config is None or (weights, config) in (old_pair, new_pair), "a mixed pair was visible"
    # Nothing is left but the adapter's two files.
    assert sorted(os.listdir(target)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_a_failed_undo_is_named_in_the_error(tmp_path, monkeypatch):
    target = tmp_path / "adapter"
    saved_nested(target)
    real_replace = os.replace

    def failing(src, dst):
        if str(src).endswith("adapter_config.json.tmp") or str(src).endswith(".bak"):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="rename failed") as info:
        save_other(target)
    monkeypatch.setattr(os, "replace", real_replace)
    notes = " ".join(getattr(info.value, "__notes__", []))
    assert "adapter_config.json.bak could not be moved back" in notes
    assert "adapter_model.safetensors.bak could not be moved back" in notes
    # The old files are still there, under the names the note gives.
    assert (target / "adapter_config.json.bak").exists() and (target / "adapter_model.safetensors.bak").exists()


class Scaled(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class Odd(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.plain = nn.Linear(6, 6)
        if kind == "subclass":
            self.odd = Scaled(6, 6)
        else:
            self.odd = nn.utils.parametrizations.weight_norm(nn.Linear(6, 6))


@pytest.mark.parametrize(
    "kind, match",
    [
        ("subclass", "odd is an nn.Linear with its own forward .in .*Scaled"),
        ("weight_norm", "odd is a parametrized Linear"),
    ],
)
def test_linears_a_lora_layer_cannot_stand_for_are_refused(tmp_path, kind, match):
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for n in ("plain", "odd"):
        tensors[f"base_model.model.{n}.lora_A.weight"] = torch.randn(2, 6, generator=gen)
        tensors[f"base_model.model.{n}.lora_B.weight"] = torch.randn(6, 2, generator=gen)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["plain", "odd"]})
    )
    model = Odd(kind)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        lk.load_adapter(model, tmp_path)
    assert not lk.lora_layers(model)
    assert_same_state(model, snap)


def test_save_flags_must_be_bool(tmp_path):
    model = saved_nested(tmp_path / "a")
    with pytest.raises(TypeError, match="convert_to_original must be True or False"):
        lk.save_adapter(model, tmp_path / "b", convert_to_original="no")
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------ reading API
def test_public_reading_api(tmp_path):
    saved_nested(tmp_path)
    cfg = lk_io.read_config(tmp_path)
    assert cfg["r"] == 2 and cfg["peft_type"] == "LORA"
    tensors, metadata = lk_io.read_tensors(tmp_path)
    assert "base_model.model.attn.q.lora_A.weight" in tensors and metadata["lora_kernels.base"] == "original"
    # A caller that handles a field itself checks the rest without a copy of the file, under its own name.
    raw = dict(cfg, fan_in_fan_out=True)
    assert lk_io.check_config(raw, "adapter_config.json", caller="load_adapters", allow=("fan_in_fan_out",)) is raw
    with pytest.raises(
        ValueError,
        match=r"^load_adapters: unsupported adapter_config.json settings: "
        r"fan_in_fan_out=True",
    ):
        lk_io.check_config(raw, caller="load_adapters")
    with pytest.raises(ValueError, match=r"^load_adapters: somewhere/adapter_config.json: use_rslora"):
        lk_io.check_config(dict(cfg, use_rslora="yes"), "somewhere/adapter_config.json", caller="load_adapters")
    with pytest.raises(FileNotFoundError, match="^load_adapters: "):
        lk_io.read_config(tmp_path / "nowhere", caller="load_adapters")


def test_raw_config_then_check_config_needs_no_copy_of_the_file(tmp_path):
    # A reader that handles a field itself (the serving loader takes fan_in_fan_out) reads the JSON unchecked, looks
    # at its own fields, then checks the rest: no temporary copy of a patched config.
    saved_nested(tmp_path)
    cpath = tmp_path / "adapter_config.json"
    cpath.write_text(json.dumps(dict(json.loads(cpath.read_text()), fan_in_fan_out=True)))
    raw = lk_io.read_raw_config(tmp_path, caller="load_adapters")
    assert raw["fan_in_fan_out"] is True and raw["r"] == 2
    with pytest.raises(ValueError, match="fan_in_fan_out=True"):
        lk_io.read_config(tmp_path)
    assert lk_io.read_config(tmp_path, allow=("fan_in_fan_out",)) == raw
    assert lk_io.check_config(raw, str(cpath), caller="load_adapters", allow=("fan_in_fan_out",)) is raw
    # The raw reader still refuses what is no config at all, naming the caller and the file.
    with pytest.raises(NotADirectoryError, match="^load_adapters: .* is a file"):
        lk_io.read_raw_config(cpath, caller="load_adapters")
    with pytest.raises(FileNotFoundError, match="^load_adapters: .*nowhere.adapter_config.json does not exist"):
        lk_io.read_raw_config(tmp_path / "nowhere", caller="load_adapters")
    cpath.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"^load_adapters: .*adapter_config.json must hold a JSON object, got list"):
        lk_io.read_raw_config(tmp_path, caller="load_adapters")
    cpath.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        lk_io.read_raw_config(tmp_path)


def test_tensors_by_module_and_pattern_value(tmp_path):
    model = nested_with_mixed_adapters()
    cfg = lk.save_adapter(model, tmp_path)
    tensors, _ = lk_io.read_tensors(tmp_path)
    by_module, others = lk_io.tensors_by_module(tensors)
    assert others == []
    assert sorted(by_module) == sorted(lk.lora_layers(model))
    for name, layer in lk.lora_layers(model).items():
        assert set(by_module[name]) == {"A", "B"}
        torch.testing.assert_close(by_module[name]["A"], layer.lora_A.detach(), rtol=0, atol=0)
        torch.testing.assert_close(by_module[name]["B"], layer.lora_B.detach(), rtol=0, atol=0)
        assert lk_io.adapter_key(name, "A") in tensors and lk_io.adapter_key(name, "B") in tensors
        # The config's patterns give each layer its own rank and alpha back.
        assert lk_io.pattern_value(name, cfg["rank_pattern"], cfg["r"]) == layer.r
        assert lk_io.pattern_value(name, cfg["alpha_pattern"], cfg["lora_alpha"]) == layer.alpha
    # Keys that are no lora_A / lora_B weight under PEFT's prefix are returned, not dropped; a lone part is kept.
    extra = {
        "base_model.model.x.bias": torch.zeros(1),
        "x.lora_A.weight": torch.zeros(1),
        "base_model.model.lora_A.weight": torch.zeros(1),
        "base_model.model.y.lora_B.weight": torch.ones(1),
        "base_model.model..lora_A.weight": torch.ones(1),
    }
    by_module, others = lk_io.tensors_by_module(extra)
    assert others == ["base_model.model.x.bias", "x.lora_A.weight", "base_model.model.lora_A.weight"]
    assert list(by_module) == ["y", ""] and set(by_module["y"]) == {"B"} and set(by_module[""]) == {"A"}
    with pytest.raises(ValueError, match="part must be 'A' or 'B'"):
        lk_io.adapter_key("q", "C")
    assert lk_io.adapter_key("", "A") == "base_model.model..lora_A.weight"  # the root module's key


def test_old_module_name_still_works():
    import lora_kernels.io as old
    from lora_kernels import adapter_files

    for name in (
        "save_adapter",
        "load_adapter",
        "read_config",
        "read_raw_config",
        "check_config",
        "read_tensors",
        "tensors_by_module",
        "pattern_value",
        "adapter_key",
        "exact_pattern_key",
        "WEIGHTS_NAME",
        "CONFIG_NAME",
        "PREFIX",
        "ADAPTER_DTYPES",
    ):
        assert getattr(old, name) is getattr(adapter_files, name), name
    assert lk.io is old and lk.adapter_files is adapter_files
    # Names code written before the rename used reach the same objects too.
    assert old.read_config is adapter_files.read_config and old._write_files is adapter_files._write_files
    with pytest.raises(AttributeError):
        _ = old.no_such_name


class WithEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Module()
        self.a.proj = nn.Linear(6, 6)
        self.b = nn.Module()
        self.b.proj = nn.Embedding(10, 6)  # PEFT would adapt it too if "proj" were the target


def test_target_modules_do_not_select_other_module_types(tmp_path):
    model = WithEmbedding()
    lk.inject_lora(model, ["proj"], r=2, backend="torch")
    cfg = lk.save_adapter(model, tmp_path)
    tm = cfg["target_modules"]
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(tm, str):
        import re

        selected = [n for n in names if re.fullmatch(tm, n)]
    else:
        selected = [n for n in names if any(n == t or n.endswith("." + t) for t in tm)]
    assert selected == ["a.proj"], tm
    loaded = WithEmbedding()
    lk.load_adapter(loaded, tmp_path)
    assert list(lk.lora_layers(loaded)) == ["a.proj"]


def test_original_base_adapter_into_a_pissa_changed_model_is_refused(tmp_path):
    """A file whose adapter applies to the original W0 (rank-r, saved from a plain LoRA model, as PEFT files are)
    loaded into layers whose W0 a PiSSA init replaced by the residual would compute another function: refused,
    nothing changed. A file saved against that residual (convert_to_original=False) still loads."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))
    pissa = copy.deepcopy(plain)
    lk.inject_lora(plain, ["0", "2"], r=2, alpha=4)
    for layer in lk.lora_layers(plain).values():
        nn.init.normal_(layer.lora_B, std=0.1)
    lk.save_adapter(plain, tmp_path / "original")
    lk.inject_lora(pissa, ["0", "2"], r=2, alpha=4, init="pissa")
    lk.save_adapter(pissa, tmp_path / "mutated", convert_to_original=False)
    before = {k: v.clone() for k, v in pissa.state_dict().items()}
    with pytest.raises(ValueError, match="PiSSA / LoRA-GA init.*original weight"):
        lk.load_adapter(pissa, tmp_path / "original")
    after = pissa.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    lk.load_adapter(pissa, tmp_path / "mutated")  # the residual's own adapter loads


def test_a_bare_linear_model_is_refused_before_anything_changes(tmp_path):
    # The model itself cannot be replaced in place: loading into a bare nn.Linear (a file keyed for the root module)
    # is refused like a target that matches nothing, and its weight keeps requires_grad (no layer was built).
    root = {"base_model.model..lora_A.weight": torch.randn(2, 6), "base_model.model..lora_B.weight": torch.randn(6, 2)}
    save_file(root, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ".*"})
    )
    lin = nn.Linear(6, 6)
    with pytest.raises(ValueError, match="matched no nn.Linear"):
        lk.load_adapter(lin, tmp_path)
    assert lin.weight.requires_grad and "" not in vars(lin)
