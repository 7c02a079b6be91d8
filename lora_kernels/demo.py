"""The main job: full fine-tuning vs LoRA vs LoRA-GA vs PiSSA on real data, no download, under a minute on a CPU.

    python -m lora_kernels.demo [--png PATH] [--quick] [--device cpu|cuda] [--help]

scikit-learn's bundled digits: an MLP pre-trained on digits 0–4 is fine-tuned on 5–9 by every method, at each
learning rate of a grid and several seeds; reported: steps to a target test accuracy, final accuracy, wall time, and
a PNG of the accuracy curves. Protocol and why LoRA-GA gets there first: docs/demo.md.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence

import torch
import torch.nn as nn

D_IN, HIDDEN, N_CLASSES = 64, 128, 10
TARGETS = ["0", "2", "4"]  # the three nn.Linear of the Sequential below
METHODS = ("full", "lora", "lora-ga", "pissa")
EVAL_EVERY = 5
BATCH = 32
GA_BATCHES = 8
DEFAULT_PNG = "lora_demo.png"


def make_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(D_IN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.GELU(),
        nn.Linear(HIDDEN, N_CLASSES),
    )


# ------------------------------------------------------------------------------------------------------------ data
def load_digits_task(device="cpu") -> dict[str, torch.Tensor]:
    """The pre-training set (digits 0–4) and the new task's train / validation / test split (digits 5–9).

    The split is fixed (one permutation from seed 0) so that every method and seed sees the same images."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit(
            "lora-kernels-demo: the demo's data ships with scikit-learn, which is not installed "
            "(pip install scikit-learn)"
        ) from None
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X, dtype=torch.float32) / 16.0  # pixel values 0..16
    y = torch.tensor(y, dtype=torch.long)
    X = (X - X.mean()) / X.std()
    old, new = y < 5, y >= 5
    Xn, yn = X[new], y[new]
    perm = torch.randperm(len(yn), generator=torch.Generator().manual_seed(0))
    n_tr, n_va = len(perm) // 2, len(perm) // 4
    tr, va, te = perm[:n_tr], perm[n_tr : n_tr + n_va], perm[n_tr + n_va :]
    data = {
        "pre_x": X[old],
        "pre_y": y[old],
        "train_x": Xn[tr],
        "train_y": yn[tr],
        "val_x": Xn[va],
        "val_y": yn[va],
        "test_x": Xn[te],
        "test_y": yn[te],
    }
    return {k: v.to(device) for k, v in data.items()}


def make_pretrained(data, steps: int, device="cpu") -> nn.Sequential:
    """The MLP after ``steps`` Adam steps on digits 0–4 (deterministic)."""
    torch.manual_seed(0)
    model = make_mlp().to(device)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    n = len(data["pre_y"])
    for _ in range(steps):
        idx = torch.randint(n, (64,), generator=gen).to(device)
        loss = nn.functional.cross_entropy(model(data["pre_x"][idx]), data["pre_y"][idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


# ---------------------------------------------------------------------------------------------------- fine-tuning
def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _batches(data, seed: int, count: int, offset: int):
    """``count`` training batches from a generator of its own per seed: every method gets the same stream."""
    gen = torch.Generator().manual_seed(1000 * seed + offset)
    n = len(data["train_y"])
    for _ in range(count):
        idx = torch.randint(n, (BATCH,), generator=gen).to(data["train_y"].device)
        yield data["train_x"][idx], data["train_y"][idx]


def prepare(pretrained, data, method: str, r: int, alpha: float, seed: int, backend: str | None) -> nn.Module:
    """A copy of ``pretrained`` ready to fine-tune with ``method`` (its adapters initialised for ``seed``)."""
    import lora_kernels as lk

    model = copy.deepcopy(pretrained).train()
    torch.manual_seed(seed)  # LoRA's random A
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif method in ("lora", "pissa"):
        lk.inject_lora(
            model,
            TARGETS,
            r=r,
            alpha=alpha,
            use_rslora=True,
            backend=backend,
            init="default" if method == "lora" else "pissa",
        )
    elif method == "lora-ga":
        lk.lora_ga_init(
            model,
            list(_batches(data, seed, GA_BATCHES, offset=1)),
            _loss,
            r=r,
            alpha=alpha,
            use_rslora=True,
            target_modules=TARGETS,
            backend=backend,
            seed=seed,
            progress=False,
        )
    else:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return model


def finetune(model: nn.Module, data, lr: float, steps: int, seed: int) -> dict[str, object]:
    """AdamW on ``model``'s trainable parameters; accuracy on validation and test images every EVAL_EVERY steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    eval_x = torch.cat([data["val_x"], data["test_x"]])  # one forward for both sets
    eval_y = torch.cat([data["val_y"], data["test_y"]])
    n_val = len(data["val_y"])
    steps_seen: list[int] = []
    val: list[float] = []
    test: list[float] = []

    def evaluate(step):
        with torch.no_grad():
            hit = (model(eval_x).argmax(-1) == eval_y).float()
        steps_seen.append(step)
        val.append(hit[:n_val].mean().item())
        test.append(hit[n_val:].mean().item())

    model.eval()
    evaluate(0)
    model.train()
    for step, batch in enumerate(_batches(data, seed, steps, offset=2), 1):
        loss = _loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % EVAL_EVERY == 0 or step == steps:
            model.eval()
            evaluate(step)
            model.train()
    return {"steps": steps_seen, "val": val, "test": test}


def steps_to(steps: Sequence[int], acc: Sequence[float], target: float) -> int | None:
    """The first recorded step whose accuracy is at least ``target`` (None: never)."""
    for s, a in zip(steps, acc):
        if a >= target:
            return s
    return None


def _mean_sd(xs: Sequence[float]):
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(runs: list[dict[str, object]], target: float, steps: int) -> dict[str, object]:
    """Mean/sd over seeds of one (method, lr): steps to target (a miss counts as ``steps`` for ranking only)."""
    val_hit = [steps_to(r["steps"], r["val"], target) for r in runs]
    test_hit = [steps_to(r["steps"], r["test"], target) for r in runs]
    rank_key = (
        statistics.fmean(s if s is not None else 2 * steps for s in val_hit),
        -statistics.fmean(r["val"][-1] for r in runs),
    )
    return {
        "val_hit": val_hit,
        "test_hit": test_hit,
        "rank_key": rank_key,
        "final": _mean_sd([r["test"][-1] for r in runs]),
        "seconds": statistics.fmean(r["seconds"] for r in runs),
    }


def _fmt_steps(hits: list[int | None], steps: int) -> str:
    reached = [h for h in hits if h is not None]
    if not reached:
        return f"not reached in {steps}"
    m, sd = _mean_sd(reached)
    text = f"{m:.0f} ± {sd:.0f}"
    if len(reached) < len(hits):
        text += f" ({len(reached)}/{len(hits)} seeds reached)"
    return text


def _fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


# ---------------------------------------------------------------------------------------------------------- output
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
        rows.append(
            f"| {d}×{d}, r={r}, {str(dtype).replace('torch.', '')} | {tokens} | {tb:.3f} | {tl:.3f} | {tl / tb:.2f} |"
        )
    return "\n".join(rows)


def plot(best: dict[str, dict[str, object]], target: float, r: int, alpha: float, path: str) -> str | None:
    """Mean test accuracy (line) and min..max over seeds (band) per method; returns None or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for method, res in best.items():
        curves = torch.tensor([run["test"] for run in res["runs"]]) * 100
        steps = res["runs"][0]["steps"]
        (line,) = ax.plot(steps, curves.mean(0), label=f"{method} (lr {_fmt_lr(res['lr'])})", linewidth=1.8)
        ax.fill_between(
            steps, curves.min(0).values, curves.max(0).values, color=line.get_color(), alpha=0.18, linewidth=0
        )
    ax.axhline(100 * target, color="gray", linestyle="--", linewidth=1, label=f"target {100 * target:g} %")
    ax.set_xlabel("fine-tuning step (batch of 32 images)")
    ax.set_ylabel("test accuracy on digits 5–9 (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    n_seeds = len(next(iter(best.values()))["runs"])
    lrs = ", ".join(f"{m} {_fmt_lr(res['lr'])}" for m, res in best.items())
    ax.set_title(
        f"Digits 0–4 → 5–9: rank r={r}, α={alpha:g}, ρ = α/√r = {alpha / math.sqrt(r):.3g} for every LoRA "
        f"arm\nbest AdamW lr: {lrs}; mean of {n_seeds} seeds, band = min..max",
        fontsize=10,
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------------------------ CLI
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _lr_list(text: str) -> list[float]:
    try:
        lrs = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1e-3,3e-3, got {text!r}") from None
    if not lrs or not all(math.isfinite(v) and v > 0 for v in lrs):
        raise argparse.ArgumentTypeError(f"expected positive learning rates, got {text!r}")
    return lrs


def _accuracy(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an accuracy in (0, 1], got {text!r}") from None
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected an accuracy in (0, 1] (0.9 means 90 %), got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lora-kernels-demo",
        description=__doc__.split("\n")[0],
        epilog="Data: scikit-learn's bundled digits; nothing is downloaded. The protocol: "
        "docs/demo.md in the source tree.",
    )
    parser.add_argument(
        "--png",
        default=DEFAULT_PNG,
        metavar="PATH",
        help=f"where to write the accuracy-curve plot; needs matplotlib, without it the plot is "
        f"skipped with a note (default: {DEFAULT_PNG} in the current directory)",
    )
    parser.add_argument("--no-png", action="store_true", help="do not write the plot (default: write it)")
    parser.add_argument(
        "--steps", type=_positive_int, default=150, metavar="N", help="fine-tuning steps per run (default: 150)"
    )
    parser.add_argument(
        "--pretrain-steps",
        type=_positive_int,
        default=300,
        metavar="N",
        help="pre-training steps on digits 0–4 (default: 300)",
    )
    parser.add_argument(
        "--lrs",
        type=_lr_list,
        default=[3e-3, 1e-2, 3e-2],
        metavar="LR,LR,...",
        help="AdamW learning-rate grid, the same for every method (default: 3e-3,1e-2,3e-2)",
    )
    parser.add_argument(
        "--rank",
        type=_positive_int,
        default=4,
        metavar="R",
        help="LoRA rank of every LoRA arm; LoRA-GA needs 2r <= 10, the output layer's width (default: 4)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="LoRA alpha of every LoRA arm; scaling rho = alpha/sqrt(r) (default: 2r)",
    )
    parser.add_argument(
        "--seeds",
        type=_positive_int,
        default=3,
        metavar="N",
        help="seeds per (method, lr), numbered 0, 1, ... (default: 3)",
    )
    parser.add_argument(
        "--target",
        type=_accuracy,
        default=0.9,
        metavar="ACC",
        help="target test accuracy on digits 5–9, in (0, 1] (default: 0.9)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        metavar="M,M,...",
        help=f"comma-separated subset of {', '.join(METHODS)} (default: all)",
    )
    parser.add_argument(
        "--show-grid",
        action="store_true",
        help="also print steps to target and final accuracy for every (method, lr) of the grid (default: off)",
    )
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="where to run (default: cuda when available, else cpu)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds: at most 2 seeds, 100 steps and 200 pre-training steps; lr 1e-2 unless "
        "--lrs is given (default: off)",
    )
    return parser


def main(argv=None) -> int:
    """Console entry point (``python -m lora_kernels.demo``, ``lora-kernels-demo``)."""
    run(argv)
    return 0


def run(argv=None) -> dict[str, object]:
    """Run the demo with command-line style ``argv``; returns the results (also printed and plotted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        parser.error(f"--methods: {', '.join(bad) or 'none given'}; choose from {', '.join(METHODS)}")
    args.methods = list(dict.fromkeys(methods))
    if args.alpha is None:
        args.alpha = 2.0 * args.rank
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        parser.error(f"--alpha must be a positive number, got {args.alpha}")
    if "lora-ga" in args.methods and 2 * args.rank > N_CLASSES:
        parser.error(f"--rank {args.rank}: LoRA-GA needs 2r <= {N_CLASSES} (the output layer has {N_CLASSES} rows)")
    if args.quick:
        args.seeds = min(args.seeds, 2)
        args.steps = min(args.steps, 100)
        args.pretrain_steps = min(args.pretrain_steps, 200)
        if not any(a == "--lrs" or a.startswith("--lrs=") for a in (argv if argv is not None else sys.argv[1:])):
            args.lrs = [1e-2]
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device cuda: no CUDA device is available to this torch ({torch.__version__}); use --device cpu"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # The PyTorch reference path on the CPU (the Triton interpreter is for tests); "auto" picks the fused kernels on
    # a GPU.
    backend = "torch" if device.type == "cpu" else None
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # These matrices are tiny: one thread is faster than several, and far faster on a busy machine.
        torch.set_num_threads(1)
    try:
        return _run(args, device, backend)
    finally:
        torch.set_num_threads(threads)


def _run(args, device, backend) -> dict[str, object]:
    from ._progress import progress

    t0 = time.perf_counter()
    data = load_digits_task(device)
    pretrained = make_pretrained(data, args.pretrain_steps, device)
    print(
        f"pre-trained a {D_IN}-{HIDDEN}-{HIDDEN}-{N_CLASSES} MLP on digits 0–4 ({len(data['pre_y'])} images, "
        f"{args.pretrain_steps} steps): {100 * accuracy(pretrained, data['pre_x'], data['pre_y']):.1f} % train "
        f"accuracy, {time.perf_counter() - t0:.1f} s on {device}"
    )
    print(
        f"new task: digits 5–9, {len(data['train_y'])} train / {len(data['val_y'])} validation / "
        f"{len(data['test_y'])} test images; the pre-trained model scores "
        f"{100 * accuracy(pretrained, data['test_x'], data['test_y']):.0f} % on its test images "
        "(classes it has never seen)"
    )
    print(
        f"fine-tuning: {', '.join(args.methods)}; LoRA arms r={args.rank}, α={args.alpha:g}, "
        f"ρ = α/√r = {args.alpha / math.sqrt(args.rank):.3g} (rsLoRA) for all; AdamW, batch {BATCH}, "
        f"{args.steps} steps; lrs {', '.join(_fmt_lr(v) for v in args.lrs)}; seeds 0..{args.seeds - 1}; "
        f"target {100 * args.target:g} % test accuracy\n"
    )
    jobs = [(m, s) for m in args.methods for s in range(args.seeds)]
    runs: dict[tuple, list[dict[str, object]]] = {}
    trainable: dict[str, int] = {}
    for method, seed in progress(jobs, desc="fine-tuning runs", unit="init"):
        t_init = time.perf_counter()
        start = prepare(pretrained, data, method, args.rank, args.alpha, seed, backend)
        init_s = time.perf_counter() - t_init  # one init per (method, seed), shared by every lr: counted in each
        trainable[method] = sum(p.numel() for p in start.parameters() if p.requires_grad)
        for lr in args.lrs:
            t1 = time.perf_counter()
            res = finetune(copy.deepcopy(start), data, lr, args.steps, seed)
            if device.type == "cuda":
                torch.cuda.synchronize()
            res["seconds"] = init_s + time.perf_counter() - t1
            runs.setdefault((method, lr), []).append(res)
    best: dict[str, dict[str, object]] = {}
    for method in args.methods:
        summaries = {lr: summarize(runs[(method, lr)], args.target, args.steps) for lr in args.lrs}
        lr = min(args.lrs, key=lambda v: summaries[v]["rank_key"])
        best[method] = dict(summaries[lr], lr=lr, runs=runs[(method, lr)], trainable=trainable[method])
    print(
        f"| method | trainable params | best lr | steps to {100 * args.target:g} % test acc. (mean ± sd) | "
        f"final test acc. (%) | time per run (s) |"
    )
    print("|---|---|---|---|---|---|")
    for method, res in best.items():
        m, sd = res["final"]
        print(
            f"| {method} | {res['trainable']:,} | {_fmt_lr(res['lr'])} | {_fmt_steps(res['test_hit'], args.steps)} | "
            f"{100 * m:.1f} ± {100 * sd:.1f} | {res['seconds']:.2f} |"
        )
    if args.show_grid:
        print("\n| method | lr | steps to target on validation images | final test acc. (%) |")
        print("|---|---|---|---|")
        for method in args.methods:
            for lr in args.lrs:
                res = summarize(runs[(method, lr)], args.target, args.steps)
                print(
                    f"| {method} | {_fmt_lr(lr)} | {_fmt_steps(res['val_hit'], args.steps)} | "
                    f"{100 * res['final'][0]:.1f} ± {100 * res['final'][1]:.1f} |"
                )
    print(
        f"\n(best lr: fewest mean steps to the target on the validation images; {args.seeds} seeds; accuracy "
        f"checked every {EVAL_EVERY} steps; time per run includes the init)"
    )
    if "lora" in best and "lora-ga" in best:
        ga, lo = best["lora-ga"]["test_hit"], best["lora"]["test_hit"]
        if all(h is not None for h in ga) and all(h is not None for h in lo):
            ratio = statistics.fmean(lo) / statistics.fmean(ga)
            print(
                f"LoRA-GA reached {100 * args.target:g} % in {ratio:.1f}× fewer steps than LoRA "
                f"(means {statistics.fmean(ga):.0f} vs {statistics.fmean(lo):.0f})."
            )
        else:
            print(
                f"LoRA-GA reached {100 * args.target:g} % in {sum(h is not None for h in ga)}/{len(ga)} seeds, "
                f"LoRA in {sum(h is not None for h in lo)}/{len(lo)} (within {args.steps} steps)."
            )
    png = None
    if not args.no_png:
        out_dir = os.path.dirname(os.path.abspath(args.png))
        os.makedirs(out_dir, exist_ok=True)
        why = plot(best, args.target, args.rank, args.alpha, args.png)
        if why is None:
            png = args.png
            print(f"accuracy curves: {png}")
        else:
            print(f"plot skipped: {why}")
    if device.type == "cuda":
        print("\nforward+backward speed on " + torch.cuda.get_device_name(device) + ":\n")
        print(speed_table(device))
    total = time.perf_counter() - t0
    print(f"\ntotal {total:.1f} s")
    return {"best": best, "runs": runs, "target": args.target, "png": png, "seconds": total, "args": vars(args)}


if __name__ == "__main__":
    raise SystemExit(main())
