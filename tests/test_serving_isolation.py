"""Serving many adapters from one model without mixing tenants: per-thread/context batches and adapter_names,
one adapter_names length rule, adapter ids of every integer dtype, copies and pickles of served models, and the
arguments the serving entry points refuse before changing anything. All on the CPU with the torch backend.

Concurrency tests force the interleaving with barriers: both requests have set their batch (or names) before either
computes, and they meet again between layers, so a shared batch would be visible in every run, not by chance.
"""

import copy
import io
import threading

import pytest
import torch
import torch.nn as nn
from _models import tiny_llama
from _tolerances import close_small_k

import lora_kernels as lk
from lora_kernels.pool import LoRABatch

K = 16
TIMEOUT = 60


# ---------------------------------------------------------------------------------------------------- helpers
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(K, K)
        self.v_proj = nn.Linear(K, K)
        self.out = nn.Linear(K, 8)

    def forward(self, x):
        return self.out(torch.relu(self.q_proj(x)) + self.v_proj(x))


def _served_block(seed=0, n_adapters=3):
    torch.manual_seed(seed)
    model = _Block()
    lk.inject_multi_lora(model, ["q_proj", "v_proj"], max_adapters=4, max_rank=4, backend="torch")
    for i in range(n_adapters):
        lk.load_multi_adapter(
            model,
            f"a{i}",
            {
                "q_proj": (torch.randn(4, K) / 4, torch.randn(K, 4)),
                "v_proj": (torch.randn(2, K) / 4, torch.randn(K, 2)),
            },
            alpha=4 + i,
        )
    return model


def _run_threads(*targets):
    """Run each callable in its own thread; returns their results, re-raising the first error."""
    results, errors = [None] * len(targets), []

    def wrap(i, fn):
        try:
            results[i] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i, fn)) for i, fn in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a request thread hung"
    if errors:
        raise errors[0]
    return results


def _barrier_hook(barrier):
    def hook(module, args):
        barrier.wait(TIMEOUT)

    return hook


# --------------------------------------------------------------------------------------------- 1. isolation
def test_use_batch_is_per_thread_under_forced_interleaving():
    model = _served_block()
    x = torch.randn(2, 3, K)
    batches = [LoRABatch.prepare([0, 1, -1, 2, 0, 1]), LoRABatch.prepare([2, 2, 1, -1, -1, 0])]
    with torch.no_grad():
        refs = []
        for b in batches:
            with lk.use_batch(model, b):
                refs.append(model(x))
    assert not torch.allclose(refs[0], refs[1])
    barrier = threading.Barrier(2)
    handle = model.v_proj.register_forward_pre_hook(_barrier_hook(barrier))  # meet again between the two layers

    def request(b):
        def run():
            with lk.use_batch(model, b), torch.no_grad():
                barrier.wait(TIMEOUT)  # both batches are set before either request computes
                out = model(x)
                barrier.wait(TIMEOUT)  # neither leaves use_batch before the other has computed
                return out

        return run

    outs = _run_threads(request(batches[0]), request(batches[1]))
    handle.remove()
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert model.q_proj.batch is None


def test_set_batch_belongs_to_the_calling_thread():
    model = _served_block()
    x = torch.randn(4, K)
    batch = LoRABatch.prepare([0, 1, 2, 0])
    with torch.no_grad():
        base = model.out(
            torch.relu(nn.functional.linear(x, model.q_proj.weight, model.q_proj.bias))
            + nn.functional.linear(x, model.v_proj.weight, model.v_proj.bias)
        )
        lk.set_batch(model, batch)
        try:
            mine = model(x)
            (other,) = _run_threads(lambda: model(x))  # another thread has no batch: the base model
            assert model.v_proj.batch is batch
        finally:
            lk.set_batch(model, None)
    torch.testing.assert_close(other, base)
    assert not torch.allclose(mine, base)
    assert model.v_proj.batch is None


def test_use_batch_refuses_a_batch_on_another_device():
    model = _served_block()
    batch = LoRABatch(4, device="meta")
    with pytest.raises(ValueError, match="batch is on meta"):
        with lk.use_batch(model, batch):
            pass
    with pytest.raises(ValueError, match="batch is on meta"):
        lk.set_batch(model, batch)
    with pytest.raises(TypeError, match="LoRABatch"):
        lk.set_batch(model, [0, 1])
    assert model.q_proj.batch is None


# ------------------------------------------------------------------------------------- PEFT-based fixtures
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 64


def _llama(seed=0):
    return tiny_llama(seed, vocab_size=VOCAB).eval()


def _two_adapter_peft_model():
    torch.manual_seed(1)
    pm = peft.get_peft_model(
        _llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    pm.add_adapter(
        "b", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    )
    return pm.eval()


def _tokens(batch, seq=5, seed=3):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    pm = _two_adapter_peft_model()
    pm.save_pretrained(str(root))
    return {"a": str(root), "b": str(root / "b")}


def _served_llama(adapter_dirs):
    model = _llama()
    lk.load_adapters(model, adapter_dirs, backend="torch")
    return model


def test_load_adapters_concurrent_requests_get_their_own_adapter(adapter_dirs):
    model = _served_llama(adapter_dirs)
    ids = _tokens(2)
    requests = [["a", "b"], ["b", "__base__"]]
    with torch.no_grad():
        refs = [model(ids, adapter_names=n).logits for n in requests]
    assert not torch.allclose(refs[0], refs[1])
    barrier = threading.Barrier(2)
    # Both requests have prepared their batch (in the model's pre-hook) before either reaches the second layer.
    handle = model.model.layers[1].register_forward_pre_hook(_barrier_hook(barrier))

    def request(names):
        def run():
            with torch.no_grad():
                return model(ids, adapter_names=names).logits

        return run

    outs = _run_threads(*(request(n) for n in requests))
    handle.remove()
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert all(m.batch is None for m in lk.multi_lora_layers(model).values())


def test_converted_peft_model_concurrent_requests_get_their_own_adapter():
    pm = _two_adapter_peft_model()
    conv = copy.deepcopy(pm)
    lk.from_peft(conv, backend="torch")
    ids = _tokens(2)
    requests = [["default", "b"], ["b", "__base__"]]
    with torch.no_grad():
        refs = [pm(ids, adapter_names=n).logits for n in requests]
        for n, ref in zip(requests, refs):
            torch.testing.assert_close(conv(ids, adapter_names=n).logits, ref, **close_small_k())
    barrier = threading.Barrier(2)
    handle = conv.base_model.model.model.layers[1].register_forward_pre_hook(_barrier_hook(barrier))

    def request(names):
        def run():
            with torch.no_grad():
                return conv(ids, adapter_names=names).logits

        return run

    outs = _run_threads(*(request(n) for n in requests))
    handle.remove()
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, **close_small_k())


# ------------------------------------------------------------------------------- 2. adapter_names length
def test_adapter_names_shorter_than_the_batch_is_refused_in_both_paths(adapter_dirs):
    model = _served_llama(adapter_dirs)
    pm = _two_adapter_peft_model()
    conv = copy.deepcopy(pm)
    lk.from_peft(conv, backend="torch")
    ids = _tokens(4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="2 names but the batch has 4 sequences"):
            model(ids, adapter_names=["a", "b"])
        with pytest.raises(ValueError, match="2 names but the batch has 4 sequences"):
            conv(ids, adapter_names=["default", "b"])
        with pytest.raises(ValueError):  # PEFT itself refuses it
            pm(ids, adapter_names=["default", "b"])
        with pytest.raises(TypeError, match="list of str"):
            model(ids, adapter_names="a")
        assert all(m.batch is None for m in lk.multi_lora_layers(model).values())  # nothing left set
        model(ids, adapter_names=["a", "b", "__base__", "a"])  # still serves


def test_generate_expands_names_for_beams_only_as_peft_does(adapter_dirs):
    model = _served_llama(adapter_dirs)
    pm = _two_adapter_peft_model()
    ids = _tokens(2, seed=7)
    names = ["b", "default"]
    gen = dict(max_new_tokens=3, pad_token_id=0)
    with torch.no_grad():
        # num_beams=k: each name repeated k times; same tokens as PEFT
        assert torch.equal(
            model.generate(input_ids=ids, adapter_names=["b", "a"], num_beams=2, do_sample=False, **gen),
            pm.generate(input_ids=ids, adapter_names=names, num_beams=2, do_sample=False, **gen),
        )
        # num_return_sequences without beams: no silent repetition; PEFT refuses it as well
        sample = dict(do_sample=True, num_return_sequences=2, **gen)
        with pytest.raises(ValueError, match="2 names but the batch has 4 sequences"):
            model.generate(input_ids=ids, adapter_names=["b", "a"], **sample)
        with pytest.raises(ValueError):
            pm.generate(input_ids=ids, adapter_names=names, **sample)


# --------------------------------------------------------------------------------------- 3. id dtypes
def _unsigned(name):
    return getattr(torch, name, None)


INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8] + [
    d for d in (_unsigned("uint16"), _unsigned("uint32"), _unsigned("uint64")) if d is not None
]


def _ids_tensor(values, dtype):
    if dtype == _unsigned("uint64"):  # torch.tensor cannot build uint64 values ≥ 2^63 from Python ints: use the bits
        return torch.tensor([v - 2**64 if v >= 2**63 else v for v in values], dtype=torch.int64).view(dtype)
    return torch.tensor(values, dtype=dtype)


def _out_of_range(dtype):
    """Values of this dtype that are no slot of a 4-slot pool, with those that alias a loaded slot when wrapped."""
    info = torch.iinfo(dtype)
    vals = [info.max, info.max - 2]
    if info.min < 0:
        vals += [info.min, info.min + 1]
    if info.bits == 64:
        vals += [2**32 + 1, 2**32 + 2]  # int32 wrap: slots 1 and 2
    if dtype == _unsigned("uint64"):
        vals += [2**63 + 1, 2**64 - 1, 2**64 - 2**32 + 2]  # int64 wrap: negative; int32 wrap: -1 and slot 2
    return vals


def _manual(model_layer, x, slots):
    """Reference of one MultiLoRALinear: base + each token's adapter (slots outside the loaded ones: none)."""
    pool = model_layer.pool
    y = nn.functional.linear(x, model_layer.weight, model_layer.bias).double()
    for t, s in enumerate(slots):
        if 0 <= s < pool.max_adapters and pool.host_ranks[s] > 0:
            r = pool.host_ranks[s]
            a, b = pool.A_stack[s, :r].double(), pool.B_stack[s, :, :r].double()
            y[t] += float(pool.scales[s, 0]) * (b @ (a @ x[t].double()))
    return y


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_ids_of_every_integer_dtype_never_alias_a_slot(dtype):
    model = _served_block()
    layer = model.q_proj
    bad = _out_of_range(dtype)
    values = [0, 1, 2, -1 if torch.iinfo(dtype).min < 0 else 0] + bad
    x = torch.randn(len(values), K)
    batch = LoRABatch.prepare(_ids_tensor(values, dtype))
    # kept as given where int32 holds them (the kernels skip ids < 0 or >= L), else -1: never a slot of the pool
    assert all(s < 0 or s >= 4 for s in batch.token_slots[: len(values)].tolist()[4:])
    want = _manual(layer, x, [v if v < 4 else -1 for v in values])
    got = lk.multi_lora_linear(x, layer.weight, layer.bias, layer.pool, batch, backend="torch", check=False)
    torch.testing.assert_close(got.double(), want, **close_small_k())
    with pytest.raises(ValueError, match="token 4"):  # the eager check still names them
        lk.multi_lora_linear(x, layer.weight, layer.bias, layer.pool, batch, backend="torch")


def test_out_of_range_ids_stay_no_adapter_under_torch_compile():
    uint64 = _unsigned("uint64")
    if uint64 is None:
        pytest.skip("this torch has no uint64")
    torch._dynamo.reset()
    model = _served_block()
    x = torch.randn(6, K)
    values = [0, 2**32 + 1, 2, 2**64 - 2**32 + 2, 1, -1 + 2**64]
    batch = LoRABatch.prepare(_ids_tensor(values, uint64))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # the eager id check is skipped here
    with torch.no_grad(), lk.use_batch(model, batch):
        got = compiled(x)
    with torch.no_grad(), lk.use_batch(model, LoRABatch.prepare([0, -1, 2, -1, 1, -1])):
        want = model(x)
    torch.testing.assert_close(got, want, **close_small_k())


def test_ids_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="adapter_ids holds 9223372036854775808"):
        LoRABatch.prepare([0, 2**63])
    with pytest.raises(ValueError, match="adapter_ids"):
        LoRABatch.prepare([-(2**63) - 1])
    with pytest.raises(ValueError, match="adapter_ids"):
        LoRABatch.prepare_sequences([0, 2**70], 2)
    for dtype in (torch.bool, torch.float32, torch.float16, torch.complex64):
        with pytest.raises(TypeError, match="adapter_ids must be an integer tensor"):
            LoRABatch.prepare(torch.zeros(3, dtype=dtype))
    with pytest.raises(TypeError, match="adapter_ids must be ints"):
        LoRABatch.prepare([0, True])
    with pytest.raises(TypeError, match="adapter_ids must be ints"):
        LoRABatch.prepare([0, 1.0])


# --------------------------------------------------------------------------------- 4. copies and pickles
def test_deepcopy_and_pickle_of_a_load_adapters_model_serve_on_their_own(adapter_dirs):
    model = _served_llama(adapter_dirs)
    ids = _tokens(3)
    names = ["b", "__base__", "a"]
    gen = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        ref = model(ids, adapter_names=names).logits
        ref_gen = model.generate(input_ids=ids, adapter_names=names, **gen)
    twin = copy.deepcopy(model)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    lk.unload_multi_adapter(model, "a")  # the copies must not depend on the original any more
    lk.unload_multi_adapter(model, "b")
    for copy_ in (twin, loaded):
        with torch.no_grad():
            torch.testing.assert_close(copy_(ids, adapter_names=names).logits, ref, rtol=0, atol=0)
            assert torch.equal(copy_.generate(input_ids=ids, adapter_names=names, **gen), ref_gen)
        assert all(m.batch is None for m in lk.multi_lora_layers(copy_).values())


def test_deepcopy_and_pickle_of_a_converted_peft_model_honour_adapter_names():
    pm = _two_adapter_peft_model()
    conv = copy.deepcopy(pm)
    lk.from_peft(conv, backend="torch")
    ids = _tokens(2)
    names = ["b", "__base__"]
    with torch.no_grad():
        ref = pm(ids, adapter_names=names).logits
        twin = copy.deepcopy(conv)
        torch.testing.assert_close(twin(ids, adapter_names=names).logits, ref, **close_small_k())
    # The tuner (which holds the mixed-batch hooks) pickles, and the loaded copy serves mixed batches.
    buf = io.BytesIO()
    torch.save(conv.base_model, buf)
    buf.seek(0)
    tuner = torch.load(buf, weights_only=False)
    with torch.no_grad():
        with tuner._enable_peft_forward_hooks(adapter_names=names):
            got = tuner(input_ids=ids).logits
    torch.testing.assert_close(got, ref, **close_small_k())


# ------------------------------------------------------------------------------------- 9. scales stay fp32
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_keeps_the_pool_scales_float32(dtype):
    layer = lk.MultiLoRALinear(K, 8, max_adapters=2, max_rank=2)
    layer.load_adapter("third", torch.randn(2, K), torch.randn(8, 2), scale=1 / 3)
    layer.load_adapter("big", torch.randn(2, K) / 1e3, torch.randn(8, 2) / 1e3, scale=1e5)
    model = nn.Sequential(layer)
    model.half() if dtype == torch.float16 else model.to(dtype)
    assert layer.pool.A_stack.dtype == dtype and layer.pool.scales.dtype == torch.float32
    assert layer.pool.scales is layer.lora_scales
    assert layer.pool.scales[:, 0].tolist() == [torch.tensor(1 / 3).item(), 1e5]


def test_a_cast_that_overflows_loaded_adapters_warns():
    layer = lk.MultiLoRALinear(K, 8, max_adapters=2, max_rank=2)
    layer.load_adapter("fine", torch.randn(2, K), torch.randn(8, 2))
    layer.load_adapter("huge", torch.full((2, K), 1e6), torch.randn(8, 2))
    with pytest.warns(RuntimeWarning, match=r"overflowed adapter\(s\) \['huge'\]"):
        layer.half()


# ------------------------------------------------------------------------------ 14. shared and odd Linears
class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(K, K)
        self.dec = self.enc  # one module, two names

    def forward(self, x):
        return self.dec(self.enc(x))


@pytest.mark.parametrize("targets", [["enc", "dec"], ["dec"]])
def test_shared_linear_is_adapted_once_under_every_name(targets):
    model = _Shared()
    names = lk.inject_multi_lora(model, targets, max_adapters=2, max_rank=2, backend="torch")
    assert names == ["enc", "dec"]
    assert isinstance(model.enc, lk.MultiLoRALinear) and model.dec is model.enc
    a, b = torch.randn(2, K) / 4, torch.randn(K, 2)
    assert lk.load_multi_adapter(model, "x", {targets[-1]: (a, b)}) == 0
    x = torch.randn(3, K)
    with torch.no_grad(), lk.use_batch(model, LoRABatch.prepare([0, 0, 0])):
        got = model(x)

    def layer(t):
        return nn.functional.linear(t, model.enc.weight, model.enc.bias) + (t @ a.t()) @ b.t()

    torch.testing.assert_close(got, layer(layer(x)), **close_small_k())
    with pytest.raises(ValueError, match="shared layer twice"):
        lk.load_multi_adapter(model, "y", {"enc": (a, b), "dec": (a, b)})


class _OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


class _PlainSubclass(nn.Linear):
    pass


def _with(layer_factory):
    model = nn.Sequential()
    model.add_module("fc", layer_factory())
    model.add_module("ok", nn.Linear(K, K))
    return model


@pytest.mark.parametrize("case", ["own_forward", "parametrized", "weight_norm", "instance_forward"])
def test_linears_whose_behaviour_would_be_lost_are_refused(case):
    def make():
        if case == "own_forward":
            return _OwnForward(K, K)
        lin = nn.Linear(K, K)
        if case == "parametrized":
            return nn.utils.parametrizations.weight_norm(lin)
        if case == "weight_norm":
            with pytest.warns(FutureWarning):
                return nn.utils.weight_norm(lin)
        lin.forward = lambda x: nn.Linear.forward(lin, x) + 1
        return lin

    model = _with(make)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fc: .*(forward|parametrized|weight_norm)"):
        lk.inject_multi_lora(model, ["fc", "ok"], max_adapters=2, max_rank=2)
    assert not lk.multi_lora_layers(model)  # nothing replaced, not even the plain layer
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # a subclass that keeps nn.Linear's forward is a Linear
    assert lk.inject_multi_lora(_with(lambda: _PlainSubclass(K, K)), ["fc"], 2, 2) == ["fc"]


# -------------------------------------------------------------------------- 20/21. refused at the call
def test_bad_backend_and_dtype_refused_before_anything_changes(adapter_dirs):
    model = _Block()
    with pytest.raises(ValueError, match="backend='bogus'.*auto, triton, cuda, torch"):
        lk.inject_multi_lora(model, ["q_proj"], 2, 2, backend="bogus")
    with pytest.raises(ValueError, match="dtype=torch.float16"):
        lk.inject_multi_lora(model, ["q_proj"], 2, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="backend"):
        lk.MultiLoRALinear(K, K, 2, 2, backend="bogus")
    assert not lk.multi_lora_layers(model)
    llama = _llama()
    keys = list(llama.state_dict())
    with pytest.raises(ValueError, match="backend='bogus'"):
        lk.load_adapters(llama, adapter_dirs, backend="bogus")
    with pytest.raises(ValueError, match="dtype=torch.float16"):
        lk.load_adapters(llama, adapter_dirs, dtype=torch.float16)
    for arg, bad in (("max_adapters", "3"), ("max_rank", 0), ("max_adapters", True)):
        with pytest.raises(ValueError, match=f"{arg} must be a positive int"):
            lk.load_adapters(llama, adapter_dirs, **{arg: bad})
    assert not lk.multi_lora_layers(llama) and list(llama.state_dict()) == keys
    assert lk.load_adapters(llama, adapter_dirs, dtype=torch.float32, backend="TORCH") == {"a": 0, "b": 1}


def test_load_adapters_refuses_encoder_decoder_models(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        d_model=16,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        d_kv=8,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
    )
    t5 = transformers.T5ForConditionalGeneration(cfg).eval()
    pm = peft.get_peft_model(copy.deepcopy(t5), peft.LoraConfig(r=2, target_modules=["q", "v"]))
    pm.save_pretrained(str(tmp_path))
    keys = list(t5.state_dict())
    with pytest.raises(ValueError, match="encoder-decoder"):
        lk.load_adapters(t5, {"a": str(tmp_path)})
    assert not lk.multi_lora_layers(t5) and list(t5.state_dict()) == keys


def _write_adapter(path, weights, r, alpha):
    """A PEFT-format adapter directory: module name → (lora_A, lora_B)."""
    import json

    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted(weights)})
    )
    tensors = {}
    for name, (a, b) in weights.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.clone()
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return str(path)


@pytest.mark.parametrize("named", ["enc", "dec"])
def test_load_adapters_serves_a_shared_linear_under_every_name(tmp_path, named):
    model = _Shared()
    a, b = torch.randn(2, K) / 4, torch.randn(K, 2)
    path = _write_adapter(tmp_path / "x", {named: (a, b)}, r=2, alpha=4)
    assert lk.load_adapters(model, {"x": path}, backend="torch") == {"x": 0}
    assert isinstance(model.enc, lk.MultiLoRALinear) and model.dec is model.enc
    x = torch.randn(3, 1, K)
    with torch.no_grad():
        got = model(x, adapter_names=["x", "__base__", "x"])

    def layer(t, on):
        return nn.functional.linear(t, model.enc.weight, model.enc.bias) + on * 2 * (t @ a.t()) @ b.t()

    on = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    torch.testing.assert_close(got, layer(layer(x, on), on), **close_small_k())
    with pytest.raises(ValueError, match="one shared module, given twice"):
        lk.load_adapters(_Shared(), {"y": _write_adapter(tmp_path / "y", {"enc": (a, b), "dec": (a, b)}, 2, 4)})


def test_converted_encoder_decoder_beam_search_matches_peft():
    """PEFT's rule: with beams, the decoder's names are repeated per beam, the encoder's are the inputs' own."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        d_model=16,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        d_kv=8,
        vocab_size=VOCAB,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(1)
    pm = peft.get_peft_model(
        transformers.T5ForConditionalGeneration(cfg),
        peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q", "v"], init_lora_weights=False),
    )
    pm.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False))
    pm.eval()
    conv = copy.deepcopy(pm)
    lk.from_peft(conv, backend="torch")
    ids = _tokens(2, seed=5)
    gen = dict(max_new_tokens=3, num_beams=2, do_sample=False)
    with torch.no_grad():
        for names in (["b", "default"], ["__base__", "b"]):
            assert torch.equal(
                conv.generate(input_ids=ids, adapter_names=names, **gen),
                pm.generate(input_ids=ids, adapter_names=names, **gen),
            )


def test_compiled_model_use_batch_is_per_thread():
    torch._dynamo.reset()
    model = _served_block()
    x = torch.randn(6, K)
    batches = [LoRABatch.prepare([0, 1, -1, 2, 0, 1]), LoRABatch.prepare([2, 2, 1, -1, -1, 0])]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        refs = []
        for b in batches:
            with lk.use_batch(model, b):
                refs.append(model(x))
                torch.testing.assert_close(compiled(x), refs[-1])  # compiled here, before the threads
    barrier = threading.Barrier(2)

    def request(b):
        def run():
            with lk.use_batch(model, b), torch.no_grad():
                barrier.wait(TIMEOUT)
                out = compiled(x)
                barrier.wait(TIMEOUT)
                return out

        return run

    for out, ref in zip(_run_threads(request(batches[0]), request(batches[1])), refs):
        torch.testing.assert_close(out, ref)
    (alone,) = _run_threads(lambda: compiled(x))  # a thread without a batch: the base layers
    with torch.no_grad():
        torch.testing.assert_close(alone, model(x))


def test_unload_is_refused_while_a_request_uses_the_adapter(adapter_dirs):
    model = _served_block()
    with lk.use_batch(model, LoRABatch.prepare([0, 1, -1])):
        with pytest.raises(RuntimeError, match="'a1' .*in progress"):
            lk.unload_multi_adapter(model, "a1")
        with pytest.raises(RuntimeError, match="in progress"):
            model.q_proj.unload_adapter("a0")
        (other,) = _run_threads(lambda: lk.multi_adapter_slot(model, "a1"))  # still loaded, in every layer
        assert other == 1 and all("a1" in m.pool for m in lk.multi_lora_layers(model).values())
        assert lk.unload_multi_adapter(model, "a2") == 2  # not used by the request
    assert lk.unload_multi_adapter(model, "a1") == 1  # the request is done
    # ids on the device (here: not on the host) may name any slot: nothing can be unloaded meanwhile
    batch = LoRABatch.prepare([0, -1])
    batch.host_slots, batch.host_unique, batch.has_adapter = None, None, None
    with lk.use_batch(model, batch):
        with pytest.raises(RuntimeError, match="in progress"):
            lk.unload_multi_adapter(model, "a0")
    twin = copy.deepcopy(model)
    assert lk.unload_multi_adapter(twin, "a0") == 0

    # a forward with adapter_names, paused in another thread between two layers
    served = _served_llama(adapter_dirs)
    started, resume = threading.Event(), threading.Event()

    def pause(module, args):
        started.set()
        assert resume.wait(TIMEOUT)

    handle = served.model.layers[1].register_forward_pre_hook(pause)

    def request():
        with torch.no_grad():
            return served(_tokens(2), adapter_names=["a", "__base__"]).logits

    result = []
    thread = threading.Thread(target=lambda: result.append(request()))
    thread.start()
    try:
        assert started.wait(TIMEOUT)
        with pytest.raises(RuntimeError, match="'a' .*in progress"):
            lk.unload_multi_adapter(served, "a")
        assert lk.unload_multi_adapter(served, "b") == 1
    finally:
        resume.set()
        thread.join(TIMEOUT)
        handle.remove()
    assert result and lk.unload_multi_adapter(served, "a") == 0
