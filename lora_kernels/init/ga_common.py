"""The parts of LoRA-GA shared by its two model-level paths (replacing ``nn.Linear`` layers in
:mod:`~lora_kernels.init.lora_ga`, re-initialising injected or sharded ``LoRALinear`` layers in
:mod:`~lora_kernels.init.sharded`): argument checks, target selection, the loss and the loop over the estimation
batches, progress reports and the batch count over ranks. Imports no layer class."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .._progress import progress as progress_bar  # the name "progress" is lora_ga_init's argument
from ..targets import check_target_modules, named_linears, no_match_error, select
from .ga_factors import DIRECTIONS

logger = logging.getLogger("lora_kernels")

# Llama-style projection names; pass your model's names (or "all-linear") for other architectures.
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Stacked gradients of one SVD batch: 1 GiB holds 16 fp32 4096² matrices, enough to amortise launches on a GPU while
# bounding the extra memory of the SVD stage.
SVD_CHUNK_BYTES = 1 << 30

ProgressFn = Callable[[str, int, int, str], None]


# ------------------------------------------------------------------------------------------------------ targets
def select_targets(model: nn.Module, candidates: Mapping[str, nn.Module], target_modules) -> list[str]:
    """The names among ``candidates`` (name → module of ``model``) that ``target_modules`` selects, by PEFT's rules:
    ``"all-linear"`` = every candidate except the output layer (``get_output_embeddings()`` or a ``lm_head``), else
    a regex or a list of name suffixes (:func:`lora_kernels.targets.select`)."""
    return select(model, candidates, target_modules)


def resolve_targets(model: nn.Module, target_modules) -> list[str]:
    """Qualified names of the plain ``nn.Linear`` layers that ``target_modules`` selects (PEFT's matching rules;
    ``"all-linear"`` = every nn.Linear except the output layer, as in PEFT). ValueError when none is selected."""
    target_modules = check_target_modules(target_modules, allow_all_linear=True)
    candidates = named_linears(model, duplicates=False)  # a shared layer once: LoRA-GA refuses shared weights
    chosen = select(model, candidates, target_modules)
    if not chosen:
        raise no_match_error(target_modules, list(candidates))
    return chosen


# ------------------------------------------------------------------------------------------------------ checks
def check_ga_args(
    model, batches, loss_fn, r, direction, stable_gamma, num_batches, train_mode, grad_buffer, dtype
) -> None:
    """The argument checks of ``lora_ga_init`` that need no layer (shared by both paths)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"r must be a positive int, got {r!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch) or None, got {type(loss_fn).__name__}")
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise TypeError(
            f"batches must be an iterable of batches (a list, a DataLoader, a generator), got {type(batches).__name__}"
        )
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not one of {', '.join(DIRECTIONS)}")
    if not stable_gamma > 0:
        raise ValueError(f"stable_gamma must be positive, got {stable_gamma}")
    if num_batches is not None and (not isinstance(num_batches, int) or num_batches <= 0):
        raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
    if train_mode is not None and not isinstance(train_mode, bool):
        raise TypeError(f"train_mode must be True, False or None, got {type(train_mode).__name__} {train_mode!r}")
    if grad_buffer not in ("cpu", "device"):
        raise ValueError(f"grad_buffer must be 'cpu' or 'device', got {grad_buffer!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")


# ------------------------------------------------------------------------------------------------------ batches
def make_progress(progress) -> ProgressFn:
    """``lora_ga_init``'s ``progress`` argument as a callable ``(stage, done, total, name)``."""
    if callable(progress):
        return progress
    if progress:

        def _print(stage, done, total, name=""):
            print(f"lora_ga_init: {stage} {done}/{total} {name}".rstrip(), file=sys.stderr, flush=True)

        return _print

    def _log(stage, done, total, name=""):
        logger.info("lora_ga_init: %s %d/%d %s", stage, done, total, name)

    return _log


def default_loss(model: nn.Module, batch):
    device = next((p.device for p in model.parameters()), None)

    def move(v):
        return v.to(device) if isinstance(v, torch.Tensor) and device is not None else v

    if isinstance(batch, Mapping):
        return model(**{k: move(v) for k, v in batch.items()})
    return model(move(batch))


def as_loss(out) -> torch.Tensor:
    loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"the loss must be a scalar tensor or an object with .loss; got {type(out).__name__}. "
            "Pass loss_fn=lambda model, batch: ... to lora_ga_init."
        )
    if loss.numel() != 1:
        raise ValueError(f"the loss must be a scalar, got shape {tuple(loss.shape)}")
    return loss.reshape(())


@contextlib.contextmanager
def estimation_state(
    model: nn.Module, train_mode: bool | None, trainable: Sequence[torch.Tensor] | None = None
) -> Iterator[list]:
    """The model as a gradient estimate needs it, and as it was afterwards (also on error): every ``.grad`` is None
    meanwhile, ``train_mode`` (None: unchanged) is set on every module, and with ``trainable`` only those tensors
    require grad. Yields a list for the caller's hook handles, removed on exit; then every ``.grad``,
    ``requires_grad`` flag and training mode is restored."""
    params = list(model.parameters())
    saved = [(p, p.grad, p.requires_grad) for p in params]
    saved_modes = {m: m.training for m in model.modules()}
    hooks: list = []
    try:
        for p in params:
            p.grad = None
            if trainable is not None:
                p.requires_grad_(False)
        for t in trainable or ():
            t.requires_grad_(True)
        if train_mode is not None:
            model.train(bool(train_mode))
        yield hooks
    finally:
        for h in hooks:
            h.remove()
        for p, grad, flag in saved:
            p.requires_grad_(flag)
            p.grad = grad
        for m, mode in saved_modes.items():
            m.training = mode


def run_batches(
    model: nn.Module,
    batches: Iterable,
    loss_fn: Callable | None,
    num_batches: int | None,
    report: ProgressFn,
    what: str = "weight",
) -> int:
    """Forward and backward every batch (at most ``num_batches``), reporting each; returns how many ran. The hooks
    that collect the gradients are the caller's. ``what`` names the targets in the error for a loss that does not
    reach them."""
    loss_fn = loss_fn if loss_fn is not None else default_loss
    expected = num_batches if num_batches is not None else (len(batches) if hasattr(batches, "__len__") else 0)
    if hasattr(batches, "__len__") and num_batches is not None:
        expected = min(expected, len(batches))
    t0 = time.perf_counter()
    n_local = 0
    batch_iter = progress_bar(batches, total=expected or None, desc="LoRA-GA gradient", unit="batch")
    try:
        for batch in batch_iter:
            loss = as_loss(loss_fn(model, batch))
            if not loss.requires_grad:
                raise RuntimeError(f"the loss does not depend on any target {what} (no grad_fn); check target_modules")
            loss.backward()
            n_local += 1
            report("batch", n_local, expected, f"loss={loss.item():.4g} t={time.perf_counter() - t0:.1f}s")
            if num_batches is not None and n_local >= num_batches:
                break  # before drawing another batch: an iterator keeps its unused items
    finally:
        batch_iter.close()  # closes the bar now; draws nothing more from batches
    return n_local


# ------------------------------------------------------------------------------------------------------ ranks
def dist_group(process_group):
    """(group, world size) of ``process_group`` when torch.distributed is initialised, else (None, 1)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None, 1
    return process_group, dist.get_world_size(process_group)


def all_reduce_sum(t: torch.Tensor, group, like: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks; NCCL needs CUDA tensors, so CPU buffers travel to ``like``'s device for the reduction."""
    backend = dist.get_backend(group)
    if t.device.type == "cpu" and "nccl" in str(backend) and like.device.type == "cuda":
        dev = t.to(like.device)
        dist.all_reduce(dev, op=dist.ReduceOp.SUM, group=group)
        return dev
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def total_batches(n_local: int, process_group) -> int:
    """The number of estimation batches summed over the ranks of ``process_group`` (collective when distributed);
    ValueError on every rank when it is zero."""
    group, world = dist_group(process_group)
    count = torch.tensor([float(n_local)], dtype=torch.float64)
    if world > 1:
        if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
            count = count.cuda()
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    total = int(round(count.item()))
    if total == 0:
        raise ValueError("lora_ga_init got no batches (batches was empty or num_batches=0 on every rank)")
    return total
