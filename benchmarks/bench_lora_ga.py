"""LoRA-GA initialisation: the SVD stage and the whole init.

(1) SVD stage: the 224 target matrices of a 7B-shaped model (32 layers × q, k, v, o 4096×4096, gate and up
    11008×4096, down 4096×11008), fp32 gradients, r = 8 and 32: a Python loop of ``torch.svd_lowrank(G, q=4r,
    niter=4)`` (the official code's way; 0.93 s at r = 8, 3.2 s at r = 32 on an H100, TARGETS.md) against
    ``lora_kernels.init.lora_ga_factors`` on chunks of same-shaped matrices (batched matmul / QR / SVD), chunked as
    ``lora_ga_init`` does. Target: ≤ 0.3 s at r = 8. The factors of both are compared (subspaces, not raw vectors).
(2) Whole init on a small Llama-shaped model (``transformers`` LlamaForCausalLM when installed, else an equivalent
    module defined here): ``lora_ga_init`` over N batches against N plain forward+backward passes (all gradients
    formed), and its peak GPU memory against that of one such training step. Targets: time ≤ 1.10×, memory ≤ 1.05×.

Run: ``python benchmarks/bench_lora_ga.py [--quick] [--skip-svd] [--skip-init]``. On the CPU it runs tiny shapes
(a smoke test: the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora_kernels.init import lora_ga_factors
from lora_kernels.init.lora_ga import SVD_CHUNK_BYTES


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, reps=3):
    fn()  # warm-up (cuSOLVER / cuBLAS handles, workspace)
    _sync(device)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------------------------------ (1) SVD
def svd_stage(device, ranks, layers, shapes, chunk_bytes):
    print(f"\n## SVD stage: {layers} layers × {len(shapes)} matrices = {layers * len(shapes)} fp32 gradients\n")
    gen = torch.Generator(device=device).manual_seed(0)
    # One stored matrix per distinct shape, viewed `layers` times: the timing is that of distinct matrices (the
    # algorithm reads each one the same way) without holding 25 GB of random gradients.
    groups = {}
    for shape in shapes:
        groups.setdefault(shape, 0)
        groups[shape] += layers

    # Gradients of real models have a decaying spectrum; a flat (Gaussian) one would make every randomized SVD look
    # inaccurate. Rank-64 signal with decaying weights plus a small full-rank noise.
    def grad_like(m, n):
        decay = 0.9 ** torch.arange(64, device=device, dtype=torch.float32)
        left = torch.randn(m, 64, device=device, generator=gen) * decay
        return left @ torch.randn(64, n, device=device, generator=gen) / math.sqrt(n) + 1e-3 * torch.randn(
            m, n, device=device, generator=gen
        )

    base = {s: grad_like(*s) for s in groups}
    rows = [
        "| r | loop of torch.svd_lowrank (s) | batched lora_ga_factors (s) | speed-up | max projector diff |",
        "|---|---|---|---|---|",
    ]
    for r in ranks:
        q = 4 * r

        def loop():
            for s, count in groups.items():
                for _ in range(count):
                    torch.svd_lowrank(base[s], q=min(q, min(s)), niter=4)

        def batched():
            g = torch.Generator().manual_seed(0)
            for s, count in groups.items():
                per = max(1, chunk_bytes // (4 * s[0] * s[1]))
                for i in range(0, count, per):
                    n = min(per, count - i)
                    lora_ga_factors(base[s].expand(n, *s), r, niter=4, generator=g)

        t_loop = _timed(loop, device, reps=1)
        t_batched = _timed(batched, device)
        # correctness on one matrix of each shape: B/c and A/c span the same subspaces as svd_lowrank's U[:, r:2r]
        # and V[:, :r] (the matrices are random, so compare the top-2r subspace as a whole, which is well separated
        # from the rest only approximately: report the number).
        worst = 0.0
        for s in groups:
            A, B = lora_ga_factors(base[s], r, niter=4, generator=torch.Generator().manual_seed(1))
            U, S, V = torch.svd_lowrank(base[s], q=min(q, min(s)), niter=4)
            Pa = A.T @ torch.linalg.pinv(A.T)
            Pv = V[:, :r] @ V[:, :r].T
            worst = max(worst, (Pa - Pv).abs().max().item())
        rows.append(f"| {r} | {t_loop:.3f} | {t_batched:.3f} | {t_loop / t_batched:.2f}× | {worst:.2e} |")
    print("\n".join(rows))


# ------------------------------------------------------------------------------------------------- (2) init
class _RMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype)


class _Block(nn.Module):
    def __init__(self, d, inter, heads):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate_proj, self.up_proj = nn.Linear(d, inter, bias=False), nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)
        self.n1, self.n2 = _RMSNorm(d), _RMSNorm(d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.n1(x)
        q, k, v = (p(h).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.o_proj(a)
        h = self.n2(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class _TinyLlama(nn.Module):
    def __init__(self, vocab, d, inter, layers, heads):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d, inter, heads) for _ in range(layers))
        self.norm = _RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids, labels):
        x = self.embed(input_ids)
        for blk in self.layers:
            x = blk(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())


def make_model(cfg, device, dtype):
    torch.manual_seed(0)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM

        conf = LlamaConfig(
            vocab_size=cfg["vocab"],
            hidden_size=cfg["d"],
            intermediate_size=cfg["inter"],
            num_hidden_layers=cfg["layers"],
            num_attention_heads=cfg["heads"],
            num_key_value_heads=cfg["heads"],
            max_position_embeddings=cfg["seq"],
        )
        model, kind = LlamaForCausalLM(conf), "transformers LlamaForCausalLM"
    except ImportError:
        model, kind = _TinyLlama(cfg["vocab"], cfg["d"], cfg["inter"], cfg["layers"], cfg["heads"]), "_TinyLlama"
    return model.to(device=device, dtype=dtype), kind


def whole_init(device, dtype, cfg, n_batches, r):
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    gen = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=gen).to(device) for _ in range(n_batches)
    ]

    def loss_fn(model, ids):
        out = model(input_ids=ids, labels=ids)
        return out if isinstance(out, torch.Tensor) else out.loss

    def fresh():
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return make_model(cfg, device, dtype)

    def peak_reset():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def peak():
        return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")

    model, kind = fresh()
    # Baseline: plain fwd+bwd over the same batches, every gradient formed (full fine-tuning without optimizer).
    for ids in batches[:1]:
        loss_fn(model, ids).backward()
    model.zero_grad(set_to_none=True)
    _sync(device)
    peak_reset()
    t = time.perf_counter()
    for ids in batches:
        loss_fn(model, ids).backward()
    _sync(device)
    t_base = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    peak_reset()
    loss_fn(model, batches[0]).backward()
    _sync(device)
    m_step = peak()
    # A full fine-tuning AdamW step (optimizer states in the parameter dtype), for reference.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    opt.step()
    model.zero_grad(set_to_none=True)
    peak_reset()
    loss_fn(model, batches[0]).backward()
    opt.step()
    _sync(device)
    m_adamw = peak()
    del model, opt
    n_params = None
    print(
        f"\n## Whole init: {kind}, d={cfg['d']}, {cfg['layers']} layers, batch {cfg['batch']}×{cfg['seq']}, "
        f"{n_batches} batches, r={r}, {str(dtype).replace('torch.', '')}\n"
    )
    rows = [
        "| variant | time (s) | × fwd+bwd | peak mem (MiB) | × one training step |",
        "|---|---|---|---|---|",
        f"| {n_batches} plain fwd+bwd | {t_base:.3f} | 1.00 | {m_step:.0f} (one step) | 1.00 |",
    ]
    # On the CPU both buffers are host memory: one variant is enough.
    for buf in ("cpu", "device") if device.type == "cuda" else ("cpu",):
        model, _ = fresh()
        import lora_kernels as lk

        lk.lora_ga_init(model, batches[:1], loss_fn, r=r, target_modules=targets, grad_buffer=buf)  # warm-up
        del model
        model, _ = fresh()
        n_params = n_params or sum(p.numel() for p in model.parameters())
        _sync(device)
        peak_reset()
        t = time.perf_counter()
        lk.lora_ga_init(model, batches, loss_fn, r=r, target_modules=targets, grad_buffer=buf)
        _sync(device)
        t_init = time.perf_counter() - t
        m_init = peak()
        rows.append(
            f"| lora_ga_init grad_buffer={buf} | {t_init:.3f} | {t_init / t_base:.2f} | {m_init:.0f} | "
            f"{m_init / m_step:.2f} |"
        )
        del model
    print("\n".join(rows))
    print(f"\n({n_params / 1e6:.1f} M parameters; a full fine-tuning AdamW step peaks at {m_adamw:.0f} MiB)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="fewer layers / batches")
    p.add_argument("--skip-svd", action="store_true")
    p.add_argument("--skip-init", action="store_true")
    p.add_argument("--ranks", default="8,32")
    p.add_argument("--chunk-mib", type=int, default=SVD_CHUNK_BYTES >> 20, help="SVD chunk size (MiB of fp32 G)")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ranks = [int(v) for v in args.ranks.split(",")]
    print(
        f"# LoRA-GA benchmark — torch {torch.__version__}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else " (smoke run: tiny shapes)")
    )
    print("command: " + " ".join(sys.argv))
    if device.type == "cuda":
        shapes = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]
        layers = 4 if args.quick else 32
        cfg = dict(vocab=32000, d=1024, inter=2816, layers=8, heads=16, seq=512, batch=4)
        dtype, n_batches = torch.bfloat16, (4 if args.quick else 16)
    else:
        shapes = [(128, 128)] * 4 + [(344, 128)] * 2 + [(128, 344)]
        layers = 2
        ranks = sorted({min(r, 8) for r in ranks})
        cfg = dict(vocab=512, d=64, inter=176, layers=2, heads=4, seq=32, batch=2)
        dtype, n_batches = torch.float32, 2
    if not args.skip_svd:
        svd_stage(device, ranks, layers, shapes, args.chunk_mib << 20)
    if not args.skip_init:
        whole_init(device, dtype, cfg, n_batches, r=ranks[0])


if __name__ == "__main__":
    main()
