"""lora_kernels vs PEFT on tiny transformers models built from a config (random weights, no download), on the CPU.

Converted models (from_peft) must give PEFT's forward and every adapter gradient (fp32: 1e-5 relative), keep all
adapters with the active one active, leave what they cannot run exactly as PEFT layers with one warning, give PEFT's
mixed batch, and go back with to_peft. Adapter files cross between the two libraries both ways.
"""

import copy
import os
import warnings

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from _models import tiny_llama  # noqa: E402

import lora_kernels as lk  # noqa: E402
from lora_kernels import peft as pc  # noqa: E402

VOCAB = 128


# ------------------------------------------------------------------------------------------------------ models
def llama(seed=0, bias=False, dtype=torch.float32):
    return tiny_llama(seed, hidden_size=64, vocab_size=VOCAB, attention_bias=bias).to(dtype)


def gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        n_embd=64,
        n_layer=2,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def lora_config(targets, r=4, alpha=8, **kw):
    # init_lora_weights=False: B is random too, so the adapter changes the output and the gradients are non-trivial.
    kw.setdefault("init_lora_weights", False)
    kw.setdefault("lora_dropout", 0.0)
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw)


def peft_model(base, config, seed=1):
    torch.manual_seed(seed)
    return peft.get_peft_model(base, config)


def convert(model, backend="torch", expect_warning=False):
    conv = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lk.from_peft(conv, backend=backend)
    ours = [w for w in caught if issubclass(w.category, pc.PeftConversionWarning)]
    assert len(ours) == (1 if expect_warning else 0), [str(w.message) for w in ours]
    return conv, (str(ours[0].message) if ours else "")


def tokens(batch=2, seq=7, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def peft_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}


def converted_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, pc.PeftLoRALinear)}


def close(actual, expected, rtol):
    """Relative closeness scaled by the reference's magnitude (gradients have many near-zero entries)."""
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


def loss_of(model, ids):
    logits = model(ids).logits
    return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())


def check_grads(pm, conv, rtol):
    n_checked = 0
    conv_layers = converted_layers(conv)
    for name, layer in peft_layers(pm).items():
        if name not in conv_layers:
            continue
        ours = conv_layers[name]
        for ad in layer.lora_A:
            for part in ("lora_A", "lora_B"):
                ref = getattr(layer, part)[ad].weight.grad
                got = getattr(ours.lora_adapters[ad], part).grad
                if ref is None:
                    assert got is None or not got.any(), f"{name}.{part}.{ad}: gradient where PEFT has none"
                    continue
                assert got is not None, f"{name}.{part}.{ad}: no gradient"
                close(got, ref, rtol)
                n_checked += 1
    return n_checked


def matches_peft(pm, conv, ids, rtol, grad_rtol=None):
    """The converted model's logits equal PEFT's (relative ``rtol``) and, after a backward of each model's loss, so
    do the gradients (``grad_rtol``, default ``rtol``); returns how many gradients were compared."""
    ref_logits, ref_loss = loss_of(pm, ids)
    logits, loss = loss_of(conv, ids)
    close(logits.float(), ref_logits.float(), rtol)
    ref_loss.backward()
    loss.backward()
    return check_grads(pm, conv, rtol if grad_rtol is None else grad_rtol)


# ----------------------------------------------------------------------------------- forward and gradients
@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize(
    "targets", [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]
)
def test_llama_forward_and_grads_match_peft(use_rslora, targets):
    pm = peft_model(llama(), lora_config(targets, r=4, alpha=6, use_rslora=use_rslora))
    conv, _ = convert(pm)
    layers = converted_layers(conv)
    assert len(layers) == 2 * len(targets) and not peft_layers(conv)
    ids = tokens()
    assert matches_peft(pm, conv, ids, 1e-5) == 2 * 2 * len(targets)
    # The base stays frozen and nothing else got a gradient.
    for (n, p), (_, q) in zip(pm.named_parameters(), conv.named_parameters()):
        assert p.requires_grad == q.requires_grad, n


def test_llama_bias_all_trains_base_bias_like_peft():
    # LoraConfig(bias="all") makes the base layers' biases trainable; the converted layers share those biases.
    pm = peft_model(llama(bias=True), lora_config(["q_proj", "v_proj"], bias="all"))
    conv, _ = convert(pm)
    ids = tokens()
    matches_peft(pm, conv, ids, 1e-5)
    ref_b = pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.bias
    got_b = conv.base_model.model.model.layers[0].self_attn.q_proj.bias
    assert got_b.requires_grad and got_b.grad is not None
    close(got_b.grad, ref_b.grad, 1e-5)


def test_llama_bf16_matches_peft_within_bf16_tolerance():
    # PEFT keeps the adapter in fp32 on a bf16 base (autocast_adapter_dtype); the op takes fp32 adapters.
    pm = peft_model(llama(dtype=torch.bfloat16), lora_config(["q_proj", "down_proj"]))
    conv, _ = convert(pm)
    assert conv.base_model.model.model.layers[0].self_attn.q_proj.lora_A.dtype == torch.float32
    ids = tokens()
    matches_peft(pm, conv, ids, 3e-2, grad_rtol=5e-2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_autocast_bf16_matches_peft(arch):
    # Mixed-precision training (e.g. Trainer(bf16=True)): fp32 model, forward under torch.autocast.
    if arch == "llama":
        pm = peft_model(llama(), lora_config(["q_proj", "v_proj", "down_proj"]))
    else:
        pm = peft_model(gpt2(), lora_config(["c_attn", "c_fc"], fan_in_fan_out=True))
    conv, _ = convert(pm)
    ids = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, ref_loss = loss_of(pm, ids)
        logits, loss = loss_of(conv, ids)
    assert logits.dtype == ref_logits.dtype
    close(logits.float(), ref_logits.float(), 3e-2)
    ref_loss.backward()
    loss.backward()
    check_grads(pm, conv, 5e-2)
    pm.eval()
    conv.eval()
    names = ["__base__", "default"]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        close(conv(ids, adapter_names=names).logits.float(), pm(ids, adapter_names=names).logits.float(), 3e-2)


def test_gpt2_conv1d_converted_exactly():
    # GPT-2's c_attn / c_proj / c_fc are transformers Conv1D (weight [in, out], fan_in_fan_out=True in PEFT).
    pm = peft_model(gpt2(), lora_config(["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True))
    conv, _ = convert(pm)
    layers = converted_layers(conv)
    assert len(layers) == 8 and all(m.fan_in_fan_out for m in layers.values())  # c_proj: attn's and mlp's
    ids = tokens()
    assert matches_peft(pm, conv, ids, 1e-5) == 16
    # merge / unmerge in the [in, out] layout: same output merged, and W0 restored exactly.
    conv.eval()
    with torch.no_grad():
        before = conv(ids).logits
        w0 = [m.weight.detach().clone() for m in layers.values()]
        for m in layers.values():
            m.merge()
        close(conv(ids).logits, before, 1e-5)
        for m in layers.values():
            m.unmerge()
    assert all(torch.equal(m.weight, w) for m, w in zip(layers.values(), w0))


def test_triton_backend_small_llama():
    pm = peft_model(llama(), lora_config(["q_proj", "down_proj"], use_rslora=True))
    try:
        lk.lora_linear(
            torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2), 1.0, backend="triton"
        )
    except (lk.BackendError, ImportError, NotImplementedError) as exc:
        pytest.skip(f"the triton backend cannot run here: {exc}")
    conv, _ = convert(pm, backend="triton")
    ids = tokens(batch=1, seq=5)
    matches_peft(pm, conv, ids, 1e-4)


# ---------------------------------------------------------------------------- several adapters, to_peft
def two_adapter_model():
    pm = peft_model(llama(), lora_config(["q_proj", "v_proj"], r=4, alpha=8), seed=1)
    torch.manual_seed(2)
    pm.add_adapter("other", lora_config(["q_proj", "v_proj"], r=2, alpha=3, use_rslora=True))
    return pm


def test_all_adapters_kept_active_one_active_and_switchable():
    pm = two_adapter_model()
    pm.eval()
    conv, _ = convert(pm)
    for layer in converted_layers(conv).values():
        assert layer.adapter_names == ["default", "other"] and layer.active_adapter == "default"
    ids = tokens()
    with torch.no_grad():
        close(conv(ids).logits, pm(ids).logits, 1e-5)
        pm.set_adapter("other")
        lk.set_adapter(conv, "other", requires_grad=True)
        close(conv(ids).logits, pm(ids).logits, 1e-5)
        assert conv.active_adapter == "other"
        with pm.disable_adapter(), conv.disable_adapter():
            close(conv(ids).logits, pm(ids).logits, 1e-5)
    # PEFT's set_adapter makes the active adapter trainable and the others frozen; so does ours with requires_grad.
    q = conv.base_model.model.model.layers[0].self_attn.q_proj
    assert q.lora_A.requires_grad and not q.lora_adapters["default"].lora_A.requires_grad
    with pytest.raises(ValueError, match="missing"):
        lk.set_adapter(conv, "nope")


def test_to_peft_after_training_matches_peft_trained_the_same_way():
    pm = two_adapter_model()
    conv, _ = convert(pm)
    ids = tokens()
    for model in (pm, conv):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(2):
            opt.zero_grad()
            loss_of(model, ids)[1].backward()
            opt.step()
    lk.to_peft(conv)
    assert not converted_layers(conv)
    assert len(peft_layers(conv)) == len(peft_layers(pm))
    for (n, p), (n2, q) in zip(pm.named_parameters(), conv.named_parameters()):
        assert n == n2 and p.requires_grad == q.requires_grad
        close(q.detach(), p.detach(), 1e-5)
    with torch.no_grad():
        close(conv(ids).logits, pm(ids).logits, 1e-5)


def test_to_peft_then_save_pretrained_loads_in_peft(tmp_path):
    pm = two_adapter_model()
    conv, _ = convert(pm)
    with torch.no_grad():  # change the converted adapter so that the file must carry the converted tensors
        conv.base_model.model.model.layers[1].self_attn.v_proj.lora_B.mul_(3.0)
    lk.to_peft(conv)
    conv.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(llama(), os.path.join(tmp_path))
    ids = tokens()
    with torch.no_grad():
        close(loaded(ids).logits, conv(ids).logits, 1e-5)


# ------------------------------------------------------------------------------------------ unsupported
def test_dora_left_as_peft_with_one_warning():
    pm = peft_model(llama(), lora_config(["q_proj", "v_proj"], use_dora=True))
    conv, msg = convert(pm, expect_warning=True)
    assert not converted_layers(conv)
    assert msg.count("LoRA variant") == 4 and "layers.1.self_attn.v_proj" in msg
    ids = tokens()
    with torch.no_grad():
        close(conv(ids).logits, pm(ids).logits, 1e-6)


def test_mixed_support_converts_what_it_can_and_warns_once():
    # Embedding layers are left to PEFT; the Linear layers beside them are converted; outputs stay PEFT's.
    pm = peft_model(llama(), lora_config(["embed_tokens", "q_proj"]))
    conv, msg = convert(pm, expect_warning=True)
    assert "embed_tokens" in msg and "q_proj" not in msg
    assert len(converted_layers(conv)) == 2 and len(peft_layers(conv)) == 1
    ids = tokens()
    close(loss_of(conv, ids)[0], loss_of(pm, ids)[0], 1e-5)
    assert lk.peft.unsupported_peft_layers(conv).keys() == {"base_model.model.model.embed_tokens"}


@pytest.mark.parametrize("case", ["lora_bias", "conv2d", "two_active", "merged", "fan_in_fan_out_linear"])
def test_unsupported_cases_left_unconverted(case):
    if case == "conv2d":
        torch.manual_seed(0)
        base = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
        pm = peft_model(base, lora_config(["0", "2"]))
        x = torch.randn(2, 3, 6, 6)
    else:
        kw = {"lora_bias": True} if case == "lora_bias" else {}
        pm = peft_model(llama(bias=True), lora_config(["q_proj"], **kw))
        x = tokens()
        if case == "fan_in_fan_out_linear":  # get_peft_model resets it on nn.Linear; a hand-made layer may hold it
            for layer in peft_layers(pm).values():
                layer.fan_in_fan_out = True
        if case == "two_active":
            pm.add_adapter("b", lora_config(["q_proj"]))
            pm.base_model.set_adapter(["default", "b"])
        if case == "merged":
            pm.merge_adapter()
    conv, msg = convert(pm, expect_warning=True)
    n_peft = len(peft_layers(pm))
    expected_left = 1 if case == "conv2d" else n_peft
    assert len(peft_layers(conv)) == expected_left
    with torch.no_grad():
        out_ref, out = pm(x), conv(x)
        out_ref = getattr(out_ref, "logits", out_ref)
        out = getattr(out, "logits", out)
        close(out, out_ref, 1e-5)


# ------------------------------------------------------------------------------------------- mixed batch
def three_adapter_model():
    pm = two_adapter_model()
    torch.manual_seed(4)
    pm.add_adapter("third", lora_config(["q_proj", "v_proj", "down_proj"], r=8, alpha=4))
    # "third" also adapts down_proj, which the other adapters do not: such layers must convert too.
    return pm


def test_mixed_batch_forward_matches_peft():
    pm = three_adapter_model()
    conv, msg = convert(pm, expect_warning=True)  # down_proj does not hold the active adapter "default"
    assert "down_proj" in msg
    pm.eval()
    conv.eval()
    ids = tokens(batch=5)
    names = ["other", "__base__", "default", "third", "other"]
    with torch.no_grad():
        close(conv(ids, adapter_names=names).logits, pm(ids, adapter_names=names).logits, 1e-5)
    with pytest.raises(ValueError, match="non-existing"):
        conv(ids, adapter_names=["other", "nope", "default", "third", "other"])
    with pytest.raises(ValueError):
        conv(ids, adapter_names=["other"])
    conv.train()
    with pytest.raises(ValueError, match="training"):
        conv(ids, adapter_names=names)


def assert_mixed_generation_equals_peft(model, pm, ids, names):
    """Greedy generation of a mixed batch (one adapter name per sequence) equals PEFT generating each sequence alone
    with its adapter set (``"__base__"``: adapters disabled): same tokens, scores within 1e-4."""
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True)
    with torch.no_grad():
        out = model.generate(input_ids=ids, adapter_names=names, **gen)
        for i, name in enumerate(names):
            if name == "__base__":
                with pm.disable_adapter():
                    ref = pm.generate(input_ids=ids[i : i + 1], **gen)
            else:
                pm.set_adapter(name)
                ref = pm.generate(input_ids=ids[i : i + 1], **gen)
            assert torch.equal(out.sequences[i], ref.sequences[0]), (i, name)
            for s, s_ref in zip(out.scores, ref.scores):
                close(s[i], s_ref[0], 1e-4)


def test_mixed_batch_generation_equals_each_sequence_alone_in_peft():
    pm = three_adapter_model()
    conv, _ = convert(pm, expect_warning=True)
    pm.eval()
    conv.eval()
    ids = tokens(batch=4, seq=6, seed=11)
    names = ["third", "default", "__base__", "other"]
    assert_mixed_generation_equals_peft(conv, pm, ids, names)


# --------------------------------------------------------------------------------------------- adapter files
def test_adapter_saved_by_peft_loads_here(tmp_path):
    pm = peft_model(llama(), lora_config(["q_proj", "v_proj", "up_proj"], r=4, alpha=6, use_rslora=True))
    pm.save_pretrained(tmp_path)
    ours = llama()  # same seed: same base weights
    lk.load_adapter(ours, tmp_path, backend="torch")
    assert len(lk.lora_layers(ours)) == 6
    ids = tokens()
    with torch.no_grad():
        close(ours(ids).logits, pm(ids).logits, 1e-5)


def test_adapter_saved_here_loads_in_peft(tmp_path):
    ours = llama()
    lk.inject_lora(ours, ["q_proj", "o_proj", "gate_proj"], r=4, alpha=12, use_rslora=True, backend="torch")
    torch.manual_seed(5)
    with torch.no_grad():
        for layer in lk.lora_layers(ours).values():
            layer.lora_B.normal_()
    lk.save_adapter(ours, tmp_path)
    loaded = peft.PeftModel.from_pretrained(llama(), os.path.join(tmp_path))
    ids = tokens()
    with torch.no_grad():
        close(loaded(ids).logits, ours(ids).logits, 1e-5)


@pytest.mark.parametrize("pass_wrapper", [False, True])
def test_converted_model_saves_active_adapter_in_peft_format(tmp_path, pass_wrapper):
    pm = two_adapter_model()
    conv, _ = convert(pm)
    lk.set_adapter(conv, "other")
    # The PeftModel itself or its inner model: both write PEFT's keys (one "base_model.model." prefix).
    lk.save_adapter(conv if pass_wrapper else conv.base_model.model, tmp_path)
    loaded = peft.PeftModel.from_pretrained(llama(), os.path.join(tmp_path))
    pm.set_adapter("other")
    ids = tokens()
    with torch.no_grad():
        close(loaded(ids).logits, pm(ids).logits, 1e-5)


# --------------------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_converted_training_step_reduces_loss(arch):
    if arch == "llama":
        pm = peft_model(llama(), lora_config(["q_proj", "v_proj", "down_proj"], lora_dropout=0.1))
    else:
        pm = peft_model(gpt2(), lora_config(["c_attn", "c_fc"], lora_dropout=0.1, fan_in_fan_out=True))
    conv, _ = convert(pm)
    assert all(m.dropout == 0.1 for m in converted_layers(conv).values())
    conv.train()
    ids = tokens(batch=4, seq=8)
    opt = torch.optim.AdamW([p for p in conv.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = loss_of(conv, ids)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ----------------------------------------------------------------------------- serving: load_adapters
@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Three PEFT adapters of one tiny Llama, saved by PEFT: different ranks, alphas, rsLoRA and target modules."""
    root = tmp_path_factory.mktemp("adapters")
    pm = three_adapter_model()
    pm.save_pretrained(str(root))  # "default" in root, the others in sub-directories
    return pm, {"default": str(root), "other": str(root / "other"), "third": str(root / "third")}


def served(adapter_dirs, backend="torch"):
    _, dirs = adapter_dirs
    model = llama().eval()  # same seed as the PEFT model's base
    slots = lk.load_adapters(model, dirs, backend=backend)
    assert sorted(slots.values()) == [0, 1, 2]
    return model


def test_load_adapters_mixed_forward_matches_peft(adapter_dirs, monkeypatch):
    pm, _ = adapter_dirs
    pm.eval()
    model = served(adapter_dirs)
    layers = lk.multi_lora_layers(model)
    assert len(layers) == 6  # q_proj, v_proj, down_proj of both decoder layers
    ids = tokens(batch=5)
    names = ["third", "__base__", "other", "default", "third"]
    prepared = []
    real_prepare = lk.LoRABatch.prepare.__func__
    monkeypatch.setattr(
        lk.LoRABatch,
        "prepare",
        classmethod(lambda cls, *a, **k: prepared.append(real_prepare(cls, *a, **k)) or prepared[-1]),
    )
    seen = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.add(id(mod.batch))) for m in layers.values()]
    with torch.no_grad():
        out = model(ids, adapter_names=names).logits
        ref = pm(ids, adapter_names=names).logits
    for h in hooks:
        h.remove()
    close(out, ref, 1e-5)
    assert len(prepared) == 1 and seen == {id(prepared[0])}  # one batch per forward, shared by every layer
    assert all(m.batch is None for m in layers.values())  # restored after the forward
    with torch.no_grad(), pm.disable_adapter():
        close(model(ids).logits, pm(ids).logits, 1e-5)  # no adapter_names: the base model


def test_load_adapters_mixed_generation_equals_each_sequence_alone_in_peft(adapter_dirs):
    pm, _ = adapter_dirs
    pm.eval()
    model = served(adapter_dirs)
    ids = tokens(batch=4, seq=6, seed=12)
    names = ["other", "third", "__base__", "default"]
    assert_mixed_generation_equals_peft(model, pm, ids, names)
    pm.set_adapter("default")


def test_load_adapters_beam_search_matches_peft(adapter_dirs):
    pm, _ = adapter_dirs
    pm.eval()
    model = served(adapter_dirs)
    ids = tokens(batch=2, seq=5, seed=13)
    names = ["third", "other"]
    gen = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(
            model.generate(input_ids=ids, adapter_names=names, **gen),
            pm.generate(input_ids=ids, adapter_names=names, **gen),
        )


def test_load_adapters_adds_to_existing_pools_and_checks_inputs(adapter_dirs, tmp_path):
    pm, dirs = adapter_dirs
    pm.eval()
    model = llama().eval()
    assert lk.load_adapters(model, {"default": dirs["default"]}, max_adapters=3, max_rank=8, backend="torch") == {
        "default": 0
    }
    # "third" also targets down_proj: new layers there reserve the slot of "default".
    assert lk.load_adapters(model, {"third": dirs["third"], "other": dirs["other"]}) == {"third": 1, "other": 2}
    ids = tokens(batch=3)
    names = ["default", "other", "third"]
    with torch.no_grad():
        close(model(ids, adapter_names=names).logits, pm(ids, adapter_names=names).logits, 1e-5)
    with pytest.raises(ValueError, match="not loaded"):
        model(ids, adapter_names=["default", "nope", "third"])
    with pytest.raises(ValueError, match="3 sequences"):
        model(ids, adapter_names=["default", "other"])
    with pytest.raises(ValueError, match="already loaded"):
        lk.load_adapters(model, {"other": dirs["other"]})
    # An adapter for another architecture changes nothing.
    other_pm = peft_model(gpt2(), lora_config(["c_fc"], fan_in_fan_out=True))
    other_pm.save_pretrained(str(tmp_path / "gpt2"))
    before = {n: m.pool.names for n, m in lk.multi_lora_layers(model).items()}
    with pytest.raises(ValueError):
        lk.load_adapters(model, {"g": str(tmp_path / "gpt2")})
    assert before == {n: m.pool.names for n, m in lk.multi_lora_layers(model).items()}


def test_load_adapters_refuses_dora(tmp_path):
    pm = peft_model(llama(), lora_config(["q_proj"], use_dora=True))
    pm.save_pretrained(str(tmp_path))
    model = llama()
    with pytest.raises(ValueError, match="use_dora"):
        lk.load_adapters(model, {"d": str(tmp_path)})
    assert not lk.multi_lora_layers(model)


def test_load_adapters_triton_backend_small(adapter_dirs):
    pm, _ = adapter_dirs
    pm.eval()
    try:
        model = served(adapter_dirs, backend="triton")
        ids = tokens(batch=3, seq=3)
        names = ["third", "default", "__base__"]
        with torch.no_grad():
            out = model(ids, adapter_names=names).logits
    except (lk.BackendError, ImportError, NotImplementedError) as exc:
        pytest.skip(f"the triton backend cannot run here: {exc}")
    with torch.no_grad():
        close(out, pm(ids, adapter_names=names).logits, 1e-4)


def test_gpt2_converted_mixed_generation_equals_peft():
    pm = peft_model(gpt2(), lora_config(["c_attn", "c_fc"], fan_in_fan_out=True))
    torch.manual_seed(9)
    pm.add_adapter("b", lora_config(["c_attn"], r=2, fan_in_fan_out=True))
    conv, _ = convert(pm)  # c_fc lacks "b", but every layer holds the active "default": all convert
    assert len(converted_layers(conv)) == 4
    pm.eval()
    conv.eval()
    ids = tokens(batch=3, seq=5)
    names = ["b", "__base__", "default"]
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(
            conv.generate(input_ids=ids, adapter_names=names, **gen),
            pm.generate(input_ids=ids, adapter_names=names, **gen),
        )


def test_converted_model_deepcopies_and_state_dict_round_trips():
    pm = two_adapter_model()
    conv, _ = convert(pm)
    twin = copy.deepcopy(conv)
    with torch.no_grad():
        for layer in converted_layers(twin).values():
            layer.lora_adapters["other"].lora_B.add_(1.0)
            layer.lora_B.mul_(2.0)
    ids = tokens()
    with torch.no_grad():
        changed = twin(ids).logits
        conv.load_state_dict(twin.state_dict())
        close(conv(ids).logits, changed, 1e-6)
        lk.set_adapter(conv, "other")
        lk.set_adapter(twin, "other")
        close(conv(ids).logits, twin(ids).logits, 1e-6)
    # The copy's PEFT layers hold the copy's tensors: to_peft on it keeps its values, and leaves the original alone.
    lk.to_peft(twin)
    with torch.no_grad():
        close(twin(ids).logits, conv(ids).logits, 1e-6)
    assert converted_layers(conv)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_matches_peft(use_reentrant):
    pm = peft_model(llama(), lora_config(["q_proj", "down_proj"]))
    pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    pm.enable_input_require_grads()
    pm.train()
    conv, _ = convert(pm)
    ids = tokens()
    assert matches_peft(pm, conv, ids, 1e-5) == 8


def test_load_adapters_gpt2_conv1d_mixed_generation_matches_peft(tmp_path):
    pm = peft_model(gpt2(), lora_config(["c_attn", "c_proj"], fan_in_fan_out=True))
    torch.manual_seed(9)
    pm.add_adapter("b", lora_config(["c_attn", "c_fc"], r=2, alpha=5, fan_in_fan_out=True, use_rslora=True))
    pm.save_pretrained(str(tmp_path))
    model = gpt2().eval()
    keys = {k: v.shape for k, v in model.state_dict().items()}
    lk.load_adapters(model, {"a": str(tmp_path), "b": str(tmp_path / "b")}, backend="torch")
    assert {k: v.shape for k, v in model.state_dict().items()} == keys  # Conv1D weights keep their [in, out] layout
    pm.eval()
    ids = tokens(batch=3, seq=5)
    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        close(
            model(ids, adapter_names=["b", "a", "__base__"]).logits,
            pm(ids, adapter_names=["b", "default", "__base__"]).logits,
            1e-5,
        )
        assert torch.equal(
            model.generate(input_ids=ids, adapter_names=["b", "__base__", "a"], **gen),
            pm.generate(input_ids=ids, adapter_names=["b", "__base__", "default"], **gen),
        )
