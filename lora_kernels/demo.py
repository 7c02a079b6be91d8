"""The main job: full fine-tuning vs LoRA vs LoRA-GA on a small model, no download, well under a minute on a CPU.

    python -m lora_kernels.demo [--out DIR] [--steps N] [--quick] [--device cpu|cuda]
    lora-kernels-demo ...

1. "Pre-training": an MLP (32 → 128 → 128 → 128 → 16, GELU) is trained briefly to imitate a fixed random teacher
   network, from a fixed seed, so the weights are those of a trained model rather than a fresh init.
2. The new task: imitate the pre-trained model with a rank-4 change in each of its four linear layers (a shifted
   version of what it already does, the situation LoRA is made for), on fresh inputs.
3. Fine-tuning with full fine-tuning, LoRA (PEFT's default init, r, α = 2r) and LoRA-GA (official recipe, same r and
   α, rsLoRA, γ = 16, gradient from 8 batches), all with AdamW at the same learning rate, the same batches, and the
   same number of steps. Every 5 steps the loss on a fixed validation set is recorded.

Printed: a markdown table (trainable parameters, steps to reach the target validation loss, final validation loss,
time with the LoRA-GA init included) and, on a GPU, the forward+backward speed of LoRALinear against nn.Linear.
Saved: ``lora_demo_loss.png`` with the validation loss curves (log scale).

Why LoRA-GA gets there first: LoRA starts with B = 0 and a random A, so its first steps only grow B along random
directions; LoRA-GA starts with A and B spanning the top singular directions of the full fine-tuning gradient, so its
first steps already follow the best rank-2r approximation of full fine-tuning's.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import time
from typing import Dict, List, Optional

import torch
import torch.nn as nn

D_IN, HIDDEN, D_OUT = 32, 128, 16
TARGETS = ["0", "2", "4", "6"]  # the four nn.Linear of the Sequential below
EVAL_EVERY = 5


def make_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(D_IN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, D_OUT),
    )


def _inputs(n: int, gen: torch.Generator, device) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=gen).to(device)


def make_pretrained(steps: int, seed: int = 0, device="cpu") -> nn.Sequential:
    """An MLP trained for ``steps`` Adam steps to imitate a random teacher: deterministic for a seed."""
    torch.manual_seed(seed)
    teacher = make_mlp().to(device)
    model = make_mlp().to(device)
    gen = torch.Generator().manual_seed(seed + 1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x = _inputs(256, gen, device)
        with torch.no_grad():
            y = teacher(x)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def make_new_task(pretrained: nn.Sequential, seed: int = 0, rank: int = 4, strength: float = 1.0) -> nn.Sequential:
    """The new task's target network: the pre-trained one with a rank-``rank`` change in every linear layer."""
    gen = torch.Generator().manual_seed(seed + 2)
    target = copy.deepcopy(pretrained)
    with torch.no_grad():
        for name in TARGETS:
            W = target.get_submodule(name).weight
            u = torch.randn(W.shape[0], rank, generator=gen)
            v = torch.randn(rank, W.shape[1], generator=gen)
            W += (strength / math.sqrt(W.shape[1] * rank)) * (u @ v).to(W.device, W.dtype)
    for p in target.parameters():
        p.requires_grad_(False)
    return target.eval()


def _count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def finetune(pretrained, task, method: str, steps: int, lr: float, r: int, device, backend: Optional[str],
             batch: int = 128, seed: int = 0, ga_batches: int = 8) -> Dict[str, object]:
    """Fine-tune a copy of ``pretrained`` on ``task`` with ``method`` in {"full", "lora", "lora-ga"}."""
    import lora_kernels as lk

    model = copy.deepcopy(pretrained).train()
    for p in model.parameters():
        p.requires_grad_(True)
    loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    t0 = time.perf_counter()
    if method == "lora":
        lk.inject_lora(model, TARGETS, r=r, alpha=2 * r, backend=backend)
    elif method == "lora-ga":
        gen = torch.Generator().manual_seed(seed + 10)  # estimation batches: drawn apart from the training stream
        batches = []
        for _ in range(ga_batches):
            x = _inputs(batch, gen, device)
            with torch.no_grad():
                batches.append((x, task(x)))
        lk.lora_ga_init(model, batches, loss_fn, r=r, alpha=2 * r, target_modules=TARGETS, backend=backend,
                        seed=seed)
    elif method != "full":
        raise ValueError(f"method must be full, lora or lora-ga, got {method!r}")
    init_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    val_gen = torch.Generator().manual_seed(seed + 20)
    xv = _inputs(2048, val_gen, device)
    with torch.no_grad():
        yv = task(xv)

    def val_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(xv), yv).item()

    curve: List[tuple] = [(0, val_loss())]
    gen = torch.Generator().manual_seed(seed + 30)  # the same training batches for every method
    for step in range(1, steps + 1):
        x = _inputs(batch, gen, device)
        with torch.no_grad():
            y = task(x)
        loss = loss_fn(model, (x, y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % EVAL_EVERY == 0 or step == steps:
            curve.append((step, val_loss()))
    if isinstance(device, torch.device) and device.type == "cuda" or device == "cuda":
        torch.cuda.synchronize()
    total_s = time.perf_counter() - t0
    return {"method": method, "curve": curve, "trainable": _count_trainable(model), "seconds": total_s,
            "init_seconds": init_s, "final": curve[-1][1]}


def steps_to(curve, target: float) -> Optional[int]:
    for step, loss in curve:
        if loss <= target:
            return step
    return None


def speed_table(device, dtype=torch.bfloat16, tokens: int = 4096, dims=(4096,), r: int = 16) -> str:
    """Forward+backward time of LoRALinear (fused kernels) against nn.Linear, CUDA only."""
    import lora_kernels as lk

    rows = ["| layer | tokens | nn.Linear fwd+bwd (ms) | LoRALinear fwd+bwd (ms) | ratio |", "|---|---|---|---|---|"]

    def bench(fn, iters=20):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters

    for d in dims:
        base = nn.Linear(d, d, bias=False, device=device, dtype=dtype)
        layer = lk.LoRALinear.from_linear(copy.deepcopy(base), r=r, alpha=2 * r)
        x = torch.randn(tokens, d, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, d, device=device, dtype=dtype)

        def run_base():
            base.weight.requires_grad_(False)
            base(x).backward(dy)

        def run_lora():
            layer(x).backward(dy)

        tb, tl = bench(run_base), bench(run_lora)
        rows.append(f"| {d}×{d}, r={r}, {str(dtype).replace('torch.', '')} | {tokens} | {tb:.3f} | {tl:.3f} | "
                    f"{tl / tb:.2f} |")
    return "\n".join(rows)


def plot(results, target: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for res in results:
        steps, losses = zip(*res["curve"])
        ax.plot(steps, losses, label=res["method"])
    ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="target")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (MSE)")
    ax.set_title("Fine-tuning a pre-trained MLP on a shifted task (same lr, r)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    """Console entry point (``python -m lora_kernels.demo``, ``lora-kernels-demo``)."""
    run(argv)
    return 0


def run(argv=None) -> Dict[str, object]:
    """Run the demo with command-line style ``argv``; returns the results (also printed and plotted)."""
    parser = argparse.ArgumentParser(prog="lora-kernels-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".", help="directory for lora_demo_loss.png (default: current)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps per method (default 300)")
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate, the same for all methods")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--target", type=float, default=0.25,
                        help="target validation loss, as a fraction of the initial one (default 0.25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="a few seconds: fewer steps (for tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = min(args.steps, 60)
        args.pretrain_steps = min(args.pretrain_steps, 60)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # The PyTorch reference path on the CPU (the Triton interpreter is for tests); "auto" picks the fused
    # kernels on a GPU.
    backend = "torch" if device.type == "cpu" else None
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # These matrices are tiny: one thread is faster than several, and far faster on a busy machine.
        torch.set_num_threads(1)
    try:
        return _run(args, device, backend)
    finally:
        torch.set_num_threads(threads)


def _run(args, device, backend) -> Dict[str, object]:
    t0 = time.perf_counter()
    pretrained = make_pretrained(args.pretrain_steps, args.seed, device)
    task = make_new_task(pretrained, args.seed)
    print(f"pre-trained a {D_IN}-{HIDDEN}-{HIDDEN}-{HIDDEN}-{D_OUT} MLP in {time.perf_counter() - t0:.1f}s on {device}")
    results = [finetune(pretrained, task, m, args.steps, args.lr, args.rank, device, backend, seed=args.seed)
               for m in ("full", "lora", "lora-ga")]
    initial = results[0]["curve"][0][1]
    target = args.target * initial
    print(f"\nnew task: initial validation loss {initial:.4g}, target {target:.4g} ({args.target:g}×); "
          f"AdamW lr={args.lr:g}, r={args.rank}, α={2 * args.rank}, {args.steps} steps\n")
    print("| method | trainable params | steps to target | final loss | time (s) |")
    print("|---|---|---|---|---|")
    for res in results:
        s = steps_to(res["curve"], target)
        res["steps_to_target"] = s
        extra = f" (init {res['init_seconds']:.2f})" if res["method"] == "lora-ga" else ""
        print(f"| {res['method']} | {res['trainable']:,} | {s if s is not None else f'> {args.steps}'} | "
              f"{res['final']:.4g} | {res['seconds']:.1f}{extra} |")
    lora_s, ga_s = results[1]["steps_to_target"], results[2]["steps_to_target"]
    if ga_s is not None:
        ratio = (lora_s / ga_s) if lora_s is not None else float("inf")
        print(f"\nLoRA-GA reached the target in {ga_s} steps, LoRA in "
              f"{lora_s if lora_s is not None else f'more than {args.steps}'}: {ratio:.1f}× fewer steps.")
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "lora_demo_loss.png")
    plot(results, target, png)
    print(f"loss curves: {png}")
    if device.type == "cuda":
        print("\nforward+backward speed on " + torch.cuda.get_device_name(device) + ":\n")
        print(speed_table(device))
    print(f"\ntotal {time.perf_counter() - t0:.1f}s")
    return {"results": results, "target": target, "png": png}


if __name__ == "__main__":
    raise SystemExit(main())
