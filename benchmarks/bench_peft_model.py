"""A tiny-but-real transformers model with PEFT vs lora_kernels: training step and mixed-adapter decode.

Model: a Llama-like ``LlamaForCausalLM`` built from a config (random weights, no download), by default 4 layers at
hidden 2048 (intermediate 5632, 16 heads, 8 KV heads, vocab 32000), LoRA r = 16 on every linear layer of the
blocks (q, k, v, o, gate, up, down).

Training step (forward with labels, backward, AdamW step on the adapters), batch × seq tokens:

- ``peft``: the PEFT model as PEFT runs it;
- ``converted``: the same model after ``lora_kernels.from_peft`` (in place: the same tensors).

Reported: median step time (ms) and the peak memory of a step above the memory held before it (GiB), plus the
absolute peak. The converted model's logits are checked against PEFT's before anything is timed.

Mixed-adapter decode step (one new token per sequence on a KV cache of ``--context`` tokens, each sequence its own
adapter drawn from ``--adapters``, ``"__base__"`` included), eager:

- ``base``: the model without adapters;
- ``peft``: PEFT's mixed batch (``adapter_names=[...]``: one sub-batch loop per adapter in every layer);
- ``converted``: the PEFT model after ``from_peft`` (the same loop, each sub-batch through ``lora_linear``);
- ``served``: ``lora_kernels.load_adapters`` of the PEFT adapter directories into a plain transformers model
  (MultiLoRALinear pools; one LoRABatch per step shared by every layer).

The KV cache is cropped back to ``--context`` after every timed call, so every call decodes the same position.
Timings: CUDA events around each call, median of ``--steps`` calls after warm-up. On the CPU (smoke run only:
``--tiny``) the numbers mean nothing.

Run: ``python benchmarks/bench_peft_model.py [--tiny] [--csv out.csv]`` (``--help`` for more).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and the in-tree ``lora_kernels`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks import common

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -------------------------------------------------------------------------------------------------- arguments
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (smoke runs only)")
    p.add_argument("--dtype", default="bf16", choices=sorted(common.DTYPES))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--batch", type=int, default=4, help="training batch (sequences)")
    p.add_argument("--seq", type=int, default=2048, help="training sequence length")
    p.add_argument("--adapters", type=int, default=4, help="adapters served in the decode step")
    p.add_argument("--decode-batch", default="1,16,64", help="decode batch sizes (comma list)")
    p.add_argument("--context", type=int, default=256, help="tokens in the KV cache before the decode step")
    p.add_argument("--steps", type=int, default=20, help="timed calls per measurement (median)")
    p.add_argument("--backend", default=None, help="lora_kernels backend (default auto)")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-decode", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a tiny model and few steps (a smoke test, CPU friendly)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="on the CPU: the same as --tiny (seconds); on a GPU: 5 timed calls, decode batches 1 and 16",
    )
    p.add_argument(
        "--csv",
        metavar="PATH",
        default=None,
        help="also write every number to PATH (rewritten after every measurement)",
    )
    args = p.parse_args(argv)
    if args.quick:
        on_cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
        if on_cpu:
            args.tiny = True
        else:
            args.steps, args.decode_batch = min(args.steps, 5), "1,16"
    if args.tiny:
        args.layers, args.hidden, args.intermediate, args.heads, args.kv_heads = 2, 64, 128, 4, 2
        args.vocab, args.r, args.batch, args.seq, args.context, args.steps = 128, 4, 2, 16, 8, 3
        args.decode_batch = "1,4"
        args.dtype = "fp32" if args.dtype == "bf16" else args.dtype
    return args


# ------------------------------------------------------------------------------------------------------ helpers
def build_base(args, device, dtype, seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, args.context + 8) * 2,
    )
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype)


def lora_config(args, seed_offset=0):
    import peft

    # init_lora_weights=False: B is random, so the equivalence checks below compare non-trivial adapters.
    return peft.LoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False
    )


def time_calls(fn: Callable[[], object], device: torch.device, steps: int, warmup: int = 3) -> float:
    """Median ms of ``steps`` calls (CUDA events on the GPU, perf_counter on the CPU) after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    common.synchronize(device)
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_memory(fn: Callable[[], object], device: torch.device):
    """(peak above the memory held before the call, absolute peak) in GiB; (None, None) on the CPU."""
    if device.type != "cuda":
        fn()
        return None, None
    common.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    common.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return (peak - before) / 2**30, peak / 2**30


def check(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> str:
    err = common.mismatch(name, actual.float(), expected.float(), torch.float32 if dtype == torch.float32 else dtype)
    if err:
        print(f"**MISMATCH** {err}", flush=True)
        return "MISMATCH"
    return "ok"


# --------------------------------------------------------------------------------------------------- training
def bench_train(args, device, dtype, rows: list[dict]):
    import peft

    import lora_kernels as lk

    base = build_base(args, device, dtype)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, lora_config(args))
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g).to(device)
    with torch.no_grad():
        ref = model(ids[:1, :256]).logits
    lk.from_peft(model, backend=args.backend)  # in place, same tensors
    with torch.no_grad():
        status = check("converted logits vs PEFT", model(ids[:1, :256]).logits, ref, dtype)
    del ref

    results = {}
    for name in ("converted", "peft"):
        if name == "peft":
            lk.to_peft(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        ms = time_calls(step, device, args.steps)
        mem_step, mem_abs = peak_memory(step, device)
        results[name] = (ms, mem_step, mem_abs)
        del opt
    tokens = args.batch * args.seq
    print(
        f"### Training step: {args.layers} layers, hidden {args.hidden}, r={args.r} on {len(TARGETS)} modules, "
        f"{args.batch}×{args.seq} = {tokens} tokens (check: {status})\n"
    )
    print("| model | step ms | tokens/s | peak GiB above start | peak GiB | vs PEFT (time) | vs PEFT (peak) |")
    print("|---|---|---|---|---|---|---|")
    p_ms, p_mem, _ = results["peft"]
    for name in ("peft", "converted"):
        ms, mem, mem_abs = results[name]
        fmt = lambda v: f"{v:.2f}" if v is not None else "—"  # noqa: E731 (a one-line closure over the loop's values)
        mem_ratio = f"{mem / p_mem:.3f}" if mem is not None and p_mem else "—"
        print(
            f"| {name} | {ms:.2f} | {tokens / ms * 1e3:,.0f} | {fmt(mem)} | {fmt(mem_abs)} | {ms / p_ms:.3f} | "
            f"{mem_ratio} |"
        )
        rows.append(
            {
                "bench": "train",
                "model": name,
                "batch": args.batch,
                "seq": args.seq,
                "ms": ms,
                "peak_gib_step": mem,
                "peak_gib": mem_abs,
                "check": status,
            }
        )
    print(flush=True)
    del model, base
    common.free_memory(device)


# ----------------------------------------------------------------------------------------------------- decode
def bench_decode(args, device, dtype, rows: list[dict]):
    import peft
    from transformers import DynamicCache

    import lora_kernels as lk

    names = [f"a{i}" for i in range(args.adapters)]
    base = build_base(args, device, dtype)
    torch.manual_seed(1)
    pm = peft.get_peft_model(base, lora_config(args), adapter_name=names[0])
    for i, n in enumerate(names[1:], 1):
        torch.manual_seed(1 + i)
        pm.add_adapter(n, lora_config(args))
    pm.eval()
    tmp = tempfile.mkdtemp(prefix="lk_bench_adapters_")
    pm.save_pretrained(tmp, selected_adapters=names)
    dirs = {n: (tmp if n == "default" else os.path.join(tmp, n)) for n in names}  # PEFT's layout
    served = build_base(args, device, dtype).eval()  # same seed: the same base weights
    lk.load_adapters(served, dirs, backend=args.backend)
    converted = copy.deepcopy(pm)
    lk.from_peft(converted, backend=args.backend)
    converted.eval()

    rng = random.Random(0)
    print(f"### Mixed-adapter decode step: {args.adapters} adapters (+ base), context {args.context}, eager\n")
    print("| batch | base ms | peft ms | converted ms | served ms | served / peft | served / base | check |")
    print("|---|---|---|---|---|---|---|---|")
    for bsz in [int(b) for b in args.decode_batch.split(",") if b.strip()]:
        seq_names = [rng.choice(names + ["__base__"]) for _ in range(bsz)]
        g = torch.Generator().manual_seed(bsz)
        prompt = torch.randint(0, args.vocab, (bsz, args.context + 1), generator=g).to(device)
        last = prompt[:, -1:]
        timings: dict[str, float] = {}
        logits: dict[str, torch.Tensor] = {}
        runs = {
            "base": (pm, lambda m, c: m.get_base_model()(input_ids=last, past_key_values=c, use_cache=True)),
            "peft": (pm, lambda m, c: m(input_ids=last, past_key_values=c, use_cache=True, adapter_names=seq_names)),
            "converted": (
                converted,
                lambda m, c: m(input_ids=last, past_key_values=c, use_cache=True, adapter_names=seq_names),
            ),
            "served": (
                served,
                lambda m, c: m(input_ids=last, past_key_values=c, use_cache=True, adapter_names=seq_names),
            ),
        }
        for name, (model, call) in runs.items():
            with torch.no_grad():
                cache = DynamicCache()
                if name == "base":
                    with pm.disable_adapter():
                        model.get_base_model()(input_ids=prompt[:, :-1], past_key_values=cache, use_cache=True)
                else:
                    model(input_ids=prompt[:, :-1], past_key_values=cache, use_cache=True, adapter_names=seq_names)

                def one():
                    out = call(model, cache)
                    cache.crop(-1)  # drop the token just decoded: every call decodes the same position
                    return out

                if name == "base":
                    with pm.disable_adapter():
                        logits[name] = one().logits
                        timings[name] = time_calls(one, device, args.steps)
                else:
                    logits[name] = one().logits
                    timings[name] = time_calls(one, device, args.steps)
            del cache
        status = "ok"
        for name in ("converted", "served"):
            if check(f"decode b={bsz} {name} vs peft", logits[name], logits["peft"], dtype) != "ok":
                status = "MISMATCH"
        t = timings
        print(
            f"| {bsz} | {t['base']:.3f} | {t['peft']:.3f} | {t['converted']:.3f} | {t['served']:.3f} | "
            f"{t['served'] / t['peft']:.3f} | {t['served'] / t['base']:.3f} | {status} |"
        )
        for name, ms in t.items():
            rows.append(
                {
                    "bench": "decode",
                    "model": name,
                    "batch": bsz,
                    "seq": args.context,
                    "ms": ms,
                    "peak_gib_step": None,
                    "peak_gib": None,
                    "check": status,
                }
            )
    print(flush=True)
    shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    dtype = common.resolve_dtype(args.dtype)
    info = common.environment(device)
    print(
        f"## PEFT vs lora_kernels on a Llama-like model\n\n- date: {info['date']}\n- card: {info['card']}\n"
        f"- versions: torch {info['torch']}, triton {info['triton']}, peft {info['peft']}, transformers "
        f"{common._version('transformers')}\n- command: `{info['command']}`\n- dtype: {args.dtype}\n",
        flush=True,
    )
    rows: list[dict] = _LiveRows(args.csv)
    if not args.skip_train:
        bench_train(args, device, dtype, rows)
    if not args.skip_decode:
        bench_decode(args, device, dtype, rows)
    if args.csv:
        print(f"wrote {len(rows)} rows to {args.csv}")
    return list(rows)


class _LiveRows(list):
    """The result rows; with a path, the CSV is rewritten (atomically) after every row, so that an interrupted run
    keeps what it measured."""

    def __init__(self, path: str | None):
        super().__init__()
        self.path = path

    def append(self, row) -> None:
        super().append(row)
        if not self.path:
            return
        import csv

        cols = list(dict.fromkeys(c for r in self for c in r))
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = f"{self.path}.partial"
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=cols)
            writer.writeheader()
            writer.writerows(self)
        os.replace(tmp, self.path)


if __name__ == "__main__":
    main()
