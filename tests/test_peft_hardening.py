"""Converted PEFT models under careless use: alpha changed after the conversion reaches PEFT's config, PEFT's
disabled / eval state survives the conversion, merged layers, switches that fail change nothing, adapter files with
suffix-ambiguous layer names load in PEFT to the same numbers."""

import copy
import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _models import nested, tiny_llama  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels import peft as pc  # noqa: E402

VOCAB = 64


def llama(seed=0):
    return tiny_llama(seed, vocab_size=VOCAB)


def lora_config(targets, r=4, alpha=8, **kw):
    kw.setdefault("init_lora_weights", False)  # B random too: the adapter changes the output
    kw.setdefault("lora_dropout", 0.0)
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw)


def peft_model(config=None, seed=1):
    base = llama()
    torch.manual_seed(seed)
    return peft.get_peft_model(base, config or lora_config(["q_proj", "v_proj"]))


def two_adapter_model():
    pm = peft_model()
    torch.manual_seed(2)
    pm.add_adapter("other", lora_config(["q_proj", "v_proj"], r=2, alpha=3))
    return pm


def convert(model, **kw):
    conv = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pc.PeftConversionWarning)
        lk.from_peft(conv, backend="torch", **kw)
    return conv


def converted_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, pc.PeftLoRALinear)}


def tokens(batch=2, seq=5, seed=3):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids=None):
    with torch.no_grad():
        return model(tokens() if ids is None else ids).logits


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.abs().max().item(), 1e-30))


def adapter_file(tmp_path, alpha, seed=7, alpha_pattern=None):
    """A PEFT adapter for llama's q_proj/v_proj, saved by PEFT, with ``alpha``."""
    pm = peft_model(lora_config(["q_proj", "v_proj"], alpha=alpha, alpha_pattern=alpha_pattern or {}), seed=seed)
    pm.save_pretrained(tmp_path)
    return pm


# ------------------------------------------------------------------------------------------ alpha round trip
@pytest.mark.parametrize("pattern", [False, True])
def test_alpha_loaded_after_conversion_reaches_peft_config(tmp_path, pattern):
    pm = peft_model()
    conv = convert(pm)
    alpha_pattern = {"model.layers.1.self_attn.v_proj": 2} if pattern else None
    other = adapter_file(tmp_path / "new", alpha=20, alpha_pattern=alpha_pattern)
    lk.load_adapter(conv, tmp_path / "new")
    expected = logits(other)
    close(logits(conv), expected)
    lk.to_peft(conv)
    close(logits(conv), expected)  # the PEFT layers carry the new alpha / scaling
    layer = conv.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_alpha["default"] == 20 and layer.scaling["default"] == 5.0
    conv.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "adapter_config.json").read_text())
    reloaded = peft.PeftModel.from_pretrained(llama(), tmp_path / "saved")
    close(logits(reloaded), expected)
    if pattern:  # the layer that differs gets a key of its own, the others the plain field
        assert saved["lora_alpha"] == 20 and saved["alpha_pattern"] == {"model.layers.1.self_attn.v_proj": 2}
    else:  # one alpha for every layer: the plain field
        assert saved["lora_alpha"] == 20 and saved["alpha_pattern"] == {}


def test_to_peft_writes_alpha_changed_on_the_converted_layer():
    pm = peft_model()
    conv = convert(pm)
    layer = converted_layers(conv)["base_model.model.model.layers.1.self_attn.v_proj"]
    layer.alpha, layer.scaling = 2.0, 0.5  # r=4: alpha 2 → scaling 0.5
    expected = logits(conv)
    assert not torch.allclose(expected, logits(pm))
    lk.to_peft(conv)
    close(logits(conv), expected)
    peft_layer = conv.base_model.model.model.layers[1].self_attn.v_proj
    assert peft_layer.lora_alpha["default"] == 2.0 and peft_layer.scaling["default"] == 0.5
    cfg = conv.peft_config["default"]
    assert cfg.lora_alpha == 8 and cfg.alpha_pattern == {"model.layers.1.self_attn.v_proj": 2}


def test_to_peft_config_follows_dropout_and_rslora_of_a_loaded_adapter(tmp_path):
    pm = peft_model()
    conv = convert(pm)
    adapter_file(tmp_path, alpha=6)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    raw.update(use_rslora=True, lora_dropout=0.25)
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    lk.load_adapter(conv, tmp_path)
    lk.to_peft(conv)
    cfg = conv.peft_config["default"]
    assert cfg.use_rslora is True and cfg.lora_dropout == 0.25
    conv.eval()
    expected = logits(conv)
    conv.save_pretrained(tmp_path / "saved")
    close(logits(peft.PeftModel.from_pretrained(llama(), tmp_path / "saved")), expected)


# ------------------------------------------------------------------------------------------ PEFT's state kept
def test_disabled_adapters_stay_disabled_after_conversion():
    pm = peft_model()
    base_logits = logits(llama())
    pm.base_model.disable_adapter_layers()
    close(logits(pm), base_logits)
    conv = convert(pm)
    assert all(m.disable_adapters for m in converted_layers(conv).values())
    close(logits(conv), base_logits)
    conv.base_model.enable_adapter_layers()
    pm.base_model.enable_adapter_layers()
    close(logits(conv), logits(pm))
    assert not torch.allclose(logits(conv), base_logits)


def test_eval_model_from_pretrained_converts_without_dropout(tmp_path):
    src = peft_model(lora_config(["q_proj", "v_proj"], lora_dropout=0.5))
    src.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(llama(), tmp_path)  # returns an eval() model
    assert not pm.training
    conv = convert(pm)
    layers = converted_layers(conv)
    assert layers and all(not m.training for m in layers.values())
    first = logits(conv)
    assert torch.equal(first, logits(conv))  # no dropout: the same output every time
    close(first, logits(pm))
    train = convert(peft_model(lora_config(["q_proj"], lora_dropout=0.5)).train())
    assert all(m.training for m in converted_layers(train).values())


# ------------------------------------------------------------------------------------------ merged layers
def test_merged_layer_disable_adapter_gives_the_base_model():
    pm = peft_model()
    conv = convert(pm)
    layer = conv.base_model.model.model.layers[0].self_attn.q_proj
    with_adapter = logits(conv)
    layer.merge()
    close(logits(conv), with_adapter)
    with conv.disable_adapter():
        close(logits(conv), logits(llama()))
    close(logits(conv), with_adapter)
    assert layer.merged


def test_load_state_dict_into_merged_layer_merges_the_new_adapter():
    pm = peft_model()
    conv = convert(pm)
    donor = convert(peft_model(seed=11))
    state = donor.state_dict()
    expected = logits(donor)
    layer = conv.base_model.model.model.layers[1].self_attn.v_proj
    layer.merge()
    conv.load_state_dict(state)
    assert layer.merged
    close(logits(conv), expected)
    layer.unmerge()
    close(logits(conv), expected)
    torch.testing.assert_close(
        layer.weight, donor.base_model.model.model.layers[1].self_attn.v_proj.weight, rtol=0, atol=0
    )


# ------------------------------------------------------------------------------------------ all or nothing
def test_set_adapter_with_one_merged_layer_switches_nothing():
    pm = two_adapter_model()
    conv = convert(pm)
    conv.base_model.model.model.layers[1].self_attn.v_proj.merge()
    before = logits(conv)
    with pytest.raises(RuntimeError, match=r"layers\.1\.self_attn\.v_proj.*merged"):
        lk.set_adapter(conv, "other")
    assert all(m.active_adapter == "default" for m in converted_layers(conv).values())
    assert conv.active_adapter == "default"
    close(logits(conv), before)
    lk.set_adapter(conv, "default")  # the active one: nothing to switch, allowed while merged


def test_from_peft_bad_backend_refused_at_the_call():
    pm = peft_model()
    with pytest.raises(ValueError, match="backend='bogus' is not a backend"):
        lk.from_peft(pm, backend="bogus")
    assert not converted_layers(pm)
    with pytest.raises(TypeError, match="backend"):
        lk.from_peft(pm, backend=3)
    assert not converted_layers(pm)


# ------------------------------------------------------------------------------------------ files in PEFT
@pytest.mark.parametrize("all_layers", [True, False])
def test_suffix_ambiguous_names_load_in_peft_to_the_same_numbers(tmp_path, all_layers):
    model = nested()
    lk.inject_lora(model, r"attn\.q", r=3, alpha=5, backend="torch")
    lk.inject_lora(model, r"attn\.q2", r=2, alpha=7, backend="torch")
    if all_layers:
        lk.inject_lora(model, r"block\.attn\.q2?", r=2, alpha=2, backend="torch")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lk.lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.3)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
    lk.save_adapter(model, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that a custom model has no config
        loaded = peft.PeftModel.from_pretrained(nested(), tmp_path)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        close(loaded(x), model(x))
    peft_layers = {
        n: m for n, m in loaded.base_model.model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert sorted(peft_layers) == sorted(lk.lora_layers(model))
    for n, m in peft_layers.items():
        ours = lk.lora_layers(model)[n]
        assert (m.r["default"], m.lora_alpha["default"]) == (ours.r, ours.alpha), n


def test_set_adapter_and_from_peft_refuse_non_bool_flags():
    pm = two_adapter_model()
    conv = convert(pm)
    layer = conv.base_model.model.model.layers[0].self_attn.q_proj
    flags = [p.requires_grad for p in conv.parameters()]
    with pytest.raises(TypeError, match="requires_grad must be True, False or None"):
        lk.set_adapter(conv, "other", requires_grad="no")
    with pytest.raises(TypeError, match="requires_grad"):
        layer.set_adapter("other", requires_grad=0)
    with pytest.raises(TypeError, match="name must be a str"):
        lk.set_adapter(conv, 0)
    assert all(m.active_adapter == "default" for m in converted_layers(conv).values())
    assert [p.requires_grad for p in conv.parameters()] == flags
    with pytest.raises(TypeError, match="warn must be True or False"):
        lk.from_peft(peft_model(), warn="no")


def test_save_adapter_refuses_a_model_with_unconverted_peft_layers(tmp_path):
    # The embedding adapter stays a PEFT layer: a file of the converted layers alone would compute something else.
    pm = peft_model(lora_config(["q_proj", "embed_tokens"]))
    conv = copy.deepcopy(pm)
    with pytest.warns(pc.PeftConversionWarning, match="embed_tokens"):
        lk.from_peft(conv, backend="torch")
    assert converted_layers(conv)
    with pytest.raises(ValueError, match=r"still holds PEFT LoRA layers .*embed_tokens.*to_peft"):
        lk.save_adapter(conv, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_merged_layer_in_training_mode_computes_with_the_merged_weight_and_warns_once():
    pm = peft_model()
    conv = convert(pm)
    expected = logits(conv)
    layer = conv.base_model.model.model.layers[0].self_attn.q_proj
    layer.merge()
    conv.train()
    ids = tokens()
    with pytest.warns(UserWarning, match="merged PeftLoRALinear is run in training mode") as caught:
        out = conv(ids).logits
        conv(ids)
    assert sum("merged PeftLoRALinear" in str(w.message) for w in caught) == 1
    close(out.detach(), expected)


def test_to_peft_warns_when_the_config_cannot_hold_the_layers_dropouts():
    pm = peft_model()
    conv = convert(pm)
    conv.base_model.model.model.layers[0].self_attn.q_proj.dropout = 0.3
    with pytest.warns(pc.PeftConversionWarning, match=r"adapter 'default' use several lora_dropout values"):
        lk.to_peft(conv)
    assert conv.base_model.model.model.layers[0].self_attn.q_proj.lora_dropout["default"].p == 0.3


def test_disable_adapter_of_a_deepcopy_switches_the_copy_and_pickles():
    import pickle

    pm = peft_model()
    conv = convert(pm)
    twin = copy.deepcopy(conv)
    adapted, base = logits(conv), logits(llama())
    with twin.disable_adapter():
        close(logits(twin), base)
        close(logits(conv), adapted)  # the original is not switched by its copy
    close(logits(twin), adapted)
    with conv.disable_adapter():
        close(logits(twin), adapted)
    # An object of a module-level class holding only the model (a closure over the model cannot be pickled).
    switch = twin.disable_adapter
    assert "<locals>" not in type(switch).__qualname__ and vars(switch) == {"peft_model": twin}
    assert pickle.loads(pickle.dumps(type(switch))) is type(switch)
