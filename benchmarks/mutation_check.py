"""Mutation check: how many realistic bugs does the test suite catch? Run on demand, not in CI.

Each mutant below is one small bug planted in the package: (file, exact old text, new text, the tests that should
catch it). The script copies the tree to a temporary directory once, then for each mutant: restores the pristine
copy of the file, plants the bug, runs the named tests there (``python -m pytest -x``, the copy first on PYTHONPATH)
and records whether they failed. Your working tree is never modified. At the end it prints a table and the score
(caught / (caught + missed)).

Run from the repository root (each mutant is a fresh pytest process; on a CPU the Triton tests run in the
interpreter, so a full run takes a while)::

    python benchmarks/mutation_check.py --list                       # the mutants, by area
    python benchmarks/mutation_check.py --dry-run                    # is each old text still in the source, once?
    python benchmarks/mutation_check.py --area reference --area io   # some areas
    python benchmarks/mutation_check.py --only kernels/multi-rank-unclamped --only cuda/bgmv-shrink-ignores-scales
    python benchmarks/mutation_check.py                              # everything
    python benchmarks/mutation_check.py --no-baseline --timeout 600 --keep

Before the mutants, each distinct test selection runs once on the unmutated copy (``--no-baseline`` skips this):
a selection that already fails there says nothing about its mutants, which are then reported as "baseline fails".

Results: ``caught`` (the tests failed, or the process crashed), ``MISSED`` (they passed: add or sharpen a test),
``timeout`` (counted as caught: CI would fail too, but look at it), ``needs GPU`` (gpu-marked tests, not run
without CUDA; not scored), ``error`` (pytest could not run the selection,
e.g. no test matched ``-k``: fix the record), ``stale`` (the old text is not in the file exactly once: the code
changed, update the record). Exit status 0 when no mutant was missed, stale or in error; 1 otherwise.

Adding a mutant: copy a record, quote enough of the original line(s) to be unique in the file, change one thing a
plausible bug would change, and name the narrowest tests that should see it (``-k`` keeps runs short).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str  # "area/what"
    file: str  # relative to the repository root
    old: str  # exact text, present exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest arguments: files / node ids, optionally "-k", "expr"
    why: str = ""  # the bug in words
    gpu: bool = False  # its tests need a CUDA device (reported "needs GPU" elsewhere, not scored)

    @property
    def area(self) -> str:
        return self.name.split("/", 1)[0]


def M(name, file, old, new, tests, why="", gpu=False):
    return Mutant(name, file, old, new, tuple(tests), why, gpu)


MUTANTS: list[Mutant] = [
    # ------------------------------------------------------------------------------------------------- kernels
    M(
        "kernels/joined-never-computes-the-shrink-itself",
        "lora_kernels/triton/multi_lora.py",
        "        hi = tl.where(_join_wait(sync_ptr, NUM_ITEMS, SPINS) < NUM_ITEMS, NUM_WORK, 0)",
        "        hi = tl.where(_join_wait(sync_ptr, NUM_ITEMS, SPINS) < 0, NUM_WORK, 0)",
        ["tests/test_multi_lora_serving.py", "-k", "tma_gemm_matches_reference and joined"],
        "a tile of the one-launch TMA step reads xa after polling in vain instead of computing the shrink itself",
    ),
    M(
        "kernels/side-adds-rows-without-adapter",
        "lora_kernels/triton/multi_lora.py",
        "    acc += tl.where(has[:, None], side, 0.0)\n",
        "    acc += side\n",
        ["tests/test_multi_lora_serving.py", "-k", "tma_gemm_matches_reference and side"],
        "the side path's GEMM adds the fp32 buffer's rows of tokens without an adapter (never written: garbage)",
    ),
    M(
        "kernels/side-skips-the-last-part",
        "lora_kernels/triton/multi_lora.py",
        "            for blk in range(part * blocks // PARTS, (part + 1) * blocks // PARTS):\n",
        "            for blk in range(part * blocks // PARTS, (part + 1) * blocks // PARTS - (part == PARTS - 1)):\n",
        ["tests/test_multi_lora_serving.py", "-k", "tma_gemm_matches_reference and side"],
        "the side kernel leaves the last output block of each slice unwritten",
    ),
    M(
        "kernels/joined-counters-not-reset",
        "lora_kernels/triton/multi_lora.py",
        '        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")\n',
        "",
        ["tests/test_multi_lora_serving.py", "-k", "replays and joined"],
        "the one-launch TMA step's last program leaves the items counter set: the next launch reads a stale xa",
    ),
    M(
        "kernels/joined-items-skip-a-slice",
        "lora_kernels/triton/multi_lora.py",
        "    n_work = max_tiles(M, L, tile_m, cap) * len(slices)\n",
        "    n_work = max_tiles(M, L, tile_m, cap)\n",
        ["tests/test_multi_lora_serving.py", "-k", "tma_gemm_matches_reference and joined"],
        "the one-launch TMA step launches one shrink item per tile instead of one per tile and slice",
    ),
    M(
        "kernels/joined-one-counter-pair-for-every-thread",
        "lora_kernels/triton/multi_lora.py",
        "            stream = threading.get_ident()",
        "            stream = 0",
        ["tests/test_multi_lora_serving.py", "-k", "joined_counters_per_stream"],
        "two request threads share the one-launch TMA step's counters: one call's tiles count the other's items",
    ),
    M(
        "kernels/multi-rank-unclamped",
        "lora_kernels/triton/multi_lora.py",
        "rank = tl.where(usable, tl.minimum(tl.maximum(rank, 0), R), 0)",
        "rank = tl.where(usable, tl.maximum(rank, 0), 0)",
        ["tests/test_contracts.py", "-k", "clamped and triton"],
        "the multi-adapter kernels stop clamping a rank to the pool's R",
    ),
    M(
        "kernels/multi-shrink-out-not-zeroed",
        "lora_kernels/triton/multi_lora.py",
        "    out.zero_()\n    if x.shape[0] == 0:\n        return out",
        "    if x.shape[0] == 0:\n        return out",
        ["tests/test_contracts.py", "-k", "multi_lora_split_k_buffer"],
        "split-K shrink adds into an output that was never zeroed",
    ),
    M(
        "kernels/multi-fp32-tf32",
        "lora_kernels/triton/multi_lora.py",
        'acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")',
        'acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="tf32")',
        ["tests/test_contracts.py", "-k", "ieee and multi"],
        "fp32 shrink products in TF32",
    ),
    M(
        "kernels/multi-expand-scale-dropped",
        "lora_kernels/triton/multi_lora.py",
        "tl.store(y_ptrs, (y_old.to(tl.float32) + scale * acc).to(y_old.dtype), mask=mask)",
        "tl.store(y_ptrs, (y_old.to(tl.float32) + acc).to(y_old.dtype), mask=mask)",
        ["tests/test_multi_lora.py", "-k", "test_low_level_shrink_expand and triton"],
        "expand forgets the adapter's scale",
    ),
    M(
        "kernels/lora-linear-fp32-always-tf32",
        "lora_kernels/triton/_utils.py",
        'fp32_prec = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"',
        'fp32_prec = "tf32"',
        ["tests/test_contracts.py", "-k", "precision or ieee"],
        "fp32 inputs always use TF32",
    ),
    M(
        "kernels/lora-linear-split-k-partials-not-summed",
        "lora_kernels/triton/lora_linear.py",
        "                for sp in range(1, xa_splits):",
        "                for sp in range(1, 1):",
        ["tests/test_contracts.py", "-k", "split_buffers_are_zeroed"],
        "the split shrink's partial sums are not added up",
    ),
    M(
        "kernels/lora-linear-dropout-bits-column",
        "lora_kernels/reference/dropout.py",
        "    return ((w >> (k % KEEP_BITS_PER_WORD)) & 1).bool()",
        "    return ((w >> ((k + 1) % KEEP_BITS_PER_WORD)) & 1).bool()",
        ["tests/test_dropout_bits.py"],
        "the packed mask's bit order differs between packer and reader",
    ),
    M(
        "kernels/multi-expand-int32-column-offset",
        "lora_kernels/triton/multi_lora.py",
        "    y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn\n"
        "    mask = row_ok[:, None] & n_ok[None, :]",
        "    y_ptrs = y_ptr + tok[:, None] * stride_ym + offs_n[None, :] * stride_yn\n"
        "    mask = row_ok[:, None] & n_ok[None, :]",
        ["tests/test_contracts.py", "-k", "column_major_y"],
        "int32 column offsets into y: wrap past 2^31 elements for a column-major y",
        gpu=True,
    ),
    M(
        "kernels/multi-shrink-int32-out-column-offset",
        "lora_kernels/triton/multi_lora.py",
        "out = out_ptr + tok[:, None] * stride_om + (slice_idx * R + offs_r).to(tl.int64)[None, :] * stride_on",
        "out = out_ptr + tok[:, None] * stride_om + (slice_idx * R + offs_r)[None, :] * stride_on",
        ["tests/test_contracts.py", "-k", "column_major_out"],
        "int32 column offsets into the shrink output: wrap past 2^31 elements when it is column-major",
        gpu=True,
    ),
    M(
        "kernels/multi-sorted-copy-partial",
        "lora_kernels/triton/multi_lora.py",
        "            tl.store(xs_rows + offs_k64[None, :], xt, mask=copy_rows[:, None] & k_ok[None, :])",
        "            tl.store(xs_rows + offs_k64[None, :], xt, mask=copy_rows[:, None] & (offs_k64 < 8)[None, :])",
        ["tests/test_multi_lora_serving.py", "-k", "sorted-gather"],
        "the shrink writes only part of each row of the sorted copy of x",
    ),
    M(
        "kernels/multi-sorted-copy-skips-rank-0",
        "lora_kernels/triton/multi_lora.py",
        "        if (rank == 0) & (copy_x == 0):",
        "        if rank == 0:",
        ["tests/test_multi_lora_serving.py", "-k", "replays_with_new_ids and sorted-gather"],
        "tiles of a slot of rank 0 (unloaded, reserved) leave their rows out of the sorted copy of x",
    ),
    M(
        "kernels/multi-sorted-gemm-trusts-the-copy",
        "lora_kernels/triton/multi_lora.py",
        "        from_xs = tl.max((in_list & (key == NONE)).to(tl.int32), axis=0) == 0",
        "        from_xs = tl.max((in_list & (key == -5)).to(tl.int32), axis=0) == 0",
        ["tests/test_multi_lora_serving.py", "-k", "sorted-gather"],
        "the sorted GEMM reads rows without an adapter from the copy, which never holds them",
    ),
    M(
        "kernels/multi-sorted-rule-ignores-tokens-per-adapter",
        "lora_kernels/triton/multi_lora.py",
        "        and M >= SORTED_MIN_TOKENS_PER_ADAPTER * adapters\n",
        "        and M >= 0 * adapters\n",
        ["tests/test_static_serving.py", "-k", "heavy_epilogue_rule"],
        "one token per adapter still takes the sorted-row GEMM (as many adapters per sorted tile)",
    ),
    M(
        "kernels/multi-shrink-too-wide-beside-the-gemm",
        "lora_kernels/triton/multi_lora.py",
        "    block_k = _SHRINK_BLOCK_K_SMALL_TILE if tile_m <= 32 and not narrow else _SHRINK_BLOCK_K",
        "    block_k = _SHRINK_BLOCK_K_SMALL_TILE if tile_m <= 32 else _SHRINK_BLOCK_K",
        ["tests/test_static_serving.py", "-k", "pdl_pairs_fit or compiles_every"],
        "the gemm path's 32-row shrink keeps 256-deep K blocks next to an 8-warp GEMM: no room on the SM, no overlap",
    ),
    M(
        "bench/serving-model-ignores-overlap",
        "benchmarks/static_serving.py",
        "            t += (overlap * max(cur) + (1 - overlap) * serial - max(prev)) * 1e6",
        "            t += (max(cur) - max(prev)) * 1e6",
        ["tests/test_calibrate_serving.py", "-k", "overlap"],
        "predict_us overlaps a PDL pair fully whatever the overlap constant: the calibration cannot fit it",
    ),
    M(
        "bench/calibration-moves-one-constant-at-a-time",
        "benchmarks/calibrate_serving.py",
        "                        if _better(cost, current):",
        "                        if _better(cost, current) and False:",
        ["tests/test_calibrate_serving.py", "-k", "finds_the_constants"],
        "coordinate moves only: constants pinned together (cuBLAS's rate and a GEMM's slowdown) stop a step off",
    ),
    # ------------------------------------------------------------------------------------------ CUDA extension
    M(
        "cuda/bgmv-shrink-ignores-scales",
        "lora_kernels/extension.py",
        "        out_dtype=out_dtype,\n        **_slot_kwargs(token_slots, ranks, scales, device),",
        "        out_dtype=out_dtype,\n        **_slot_kwargs(token_slots, ranks, None, device),",
        ["tests/test_contracts.py", "-k", "bgmv_shrink_applies_scales"],
        "bgmv_shrink(..., scales=...) ignores the scales",
    ),
    # ----------------------------------------------------------------------------------------------- reference
    M(
        "reference/shrink-reads-padding",
        "lora_kernels/reference/multi_lora.py",
        "            a = A_stack[l, i * R : i * R + r].to(acc)\n"
        "            result[rows, i * R : i * R + r] = xl @ a.t()",
        "            a = A_stack[l, i * R : i * R + R].to(acc)\n"
        "            result[rows, i * R : i * R + R] = xl @ a.t()",
        ["tests/test_contracts.py", "-k", "reference_reads_no_padding"],
        "the reference shrink reads the pool's padding rows",
    ),
    # (The same bug in the reference *shrink* is equivalent: slicing stops at the stack's end, and the rows it reads
    # past R are the next slice's, written into the next slice's columns, which that slice then overwrites.)
    M(
        "reference/expand-rank-unclamped",
        "lora_kernels/reference/multi_lora.py",
        "        r = min(int(ranks[l]), R)\n        rows = (slots == l).nonzero().flatten()\n"
        "        upd = y[rows].to(acc)",
        "        r = int(ranks[l])\n        rows = (slots == l).nonzero().flatten()\n        upd = y[rows].to(acc)",
        ["tests/test_contracts.py", "-k", "clamped and torch"],
        "the reference expand trusts a rank above R",
    ),
    M(
        "reference/expand-scale-dropped",
        "lora_kernels/reference/multi_lora.py",
        "upd[:, off : off + width] += float(scales2[l, si]) * (sl @ b.t())",
        "upd[:, off : off + width] += sl @ b.t()",
        ["tests/test_multi_lora.py", "-k", "reference_matches_independent_oracle"],
        "the reference expand forgets the scale",
    ),
    M(
        "reference/lora-linear-db-unscaled",
        "lora_kernels/reference/lora_linear.py",
        "d_b = out(scale * (dyf.t() @ xa), lora_B.dtype)",
        "d_b = out(dyf.t() @ xa, lora_B.dtype)",
        ["tests/test_lora_linear.py", "-k", "reference_matches_float64_oracle"],
        "dB misses the LoRA scale",
    ),
    # ------------------------------------------------------------------------------------------------- modules
    M(
        "modules/rslora-ignored",
        "lora_kernels/_numerics.py",
        "return float(alpha) / (math.sqrt(r) if use_rslora else r)",
        "return float(alpha) / r",
        ["tests/test_modules.py", "-k", "test_scaling"],
        "rsLoRA scaling alpha/sqrt(r) replaced by alpha/r",
    ),
    M(
        "modules/merge-unscaled",
        "lora_kernels/_numerics.py",
        "merged = w0.to(acc) + scaling * (lora_B.to(acc) @ lora_A.to(acc))",
        "merged = w0.to(acc) + (lora_B.to(acc) @ lora_A.to(acc))",
        ["tests/test_modules.py", "-k", "merge_unmerge_round_trip"],
        "merge folds B·A without the scaling",
    ),
    M(
        "modules/merged-checkpoint-holds-merged-weight",
        "lora_kernels/modules.py",
        'if self.merged and prefix + "weight" in destination:',
        'if False and self.merged and prefix + "weight" in destination:',
        ["tests/test_modules.py", "-k", "merged_state_dict_holds_unmerged_weight"],
        "a merged layer's state_dict carries W0 + scale·B·A (the adapter applied twice on load)",
    ),
    M(
        "modules/regex-target-prefix-match",
        "lora_kernels/targets.py",
        "return re.fullmatch(target_modules, name) is not None",
        "return re.match(target_modules, name) is not None",
        [
            "tests/test_modules.py",
            "tests/test_io_hardening.py",
            "-k",
            "regex_is_full_match or pattern_keys_select_exactly_one_layer",
        ],
        "a target_modules regex matches name prefixes",
    ),
    # ------------------------------------------------------------------------------------------------------ io
    M(
        "io/rank-2r-alpha-not-doubled",
        "lora_kernels/adapter_files.py",
        "alpha = alpha * (math.sqrt(2.0) if layer.use_rslora else 2.0)",
        "alpha = alpha",
        ["tests/test_io.py", "-k", "rank_2r"],
        "the rank-2r export of a mutated base keeps alpha (scaling halves)",
    ),
    M(
        "io/pattern-unanchored",
        "lora_kernels/adapter_files.py",
        'return re.match(rf"(.*\\.)?({key})$", name) is not None',
        'return re.match(rf"(.*\\.)?({key})", name) is not None',
        ["tests/test_io_hardening.py", "-k", "pattern_keys_select_exactly_one_layer"],
        "rank_pattern / alpha_pattern keys not anchored at the end",
    ),
    M(
        "io/load-keeps-old-scaling",
        "lora_kernels/adapter_files.py",
        "            layer.scaling = lora_scaling(r, alpha, use_rslora)",
        "            pass",
        ["tests/test_io.py", "-k", "round_trip"],
        "load_adapter into existing layers updates alpha but not scaling",
    ),
    # ---------------------------------------------------------------------------------------------------- peft
    M(
        "peft/to-peft-drops-scaling",
        "lora_kernels/peft/layer.py",
        "            peft_layer.scaling[ad_name] = ad.scaling\n",
        "",
        ["tests/test_peft_hardening.py", "-k", "alpha_loaded_after_conversion_reaches_peft_config"],
        "to_peft stops writing scaling back to the PEFT layer",
    ),
    M(
        "peft/from-peft-rslora-flag-lost",
        "lora_kernels/peft/layer.py",
        'use_rslora=getattr(layer, "use_rslora", {}).get(name, False),',
        "use_rslora=False,",
        ["tests/test_peft_compat.py", "-k", "converted_model_saves_active_adapter_in_peft_format"],
        "from_peft forgets rsLoRA (the flag only: the scaling is copied)",
    ),
    M(
        "peft/set-adapter-ignored",
        "lora_kernels/peft/layer.py",
        "        peft_layer.set_adapter(self.active_adapter)",
        "        pass",
        ["tests/test_peft_compat.py", "-k", "converted_model_deepcopies_and_state_dict_round_trips"],
        "to_peft leaves PEFT's active adapter as it was",
    ),
    # ------------------------------------------------------------------------------------------------- serving
    M(
        "serving/pool-rslora-ignored",
        "lora_kernels/pool.py",
        "scales = [al / (math.sqrt(r) if use_rslora else r) for al, r in zip(alphas, ranks)]",
        "scales = [al / r for al, r in zip(alphas, ranks)]",
        ["tests/test_multi_lora.py", "-k", "test_low_level_shrink_expand and torch"],
        "AdapterPool.load ignores use_rslora",
    ),
    M(
        "serving/unload-keeps-rank",
        "lora_kernels/pool.py",
        "            self.ranks[slot] = 0\n            self.scales[slot].zero_()",
        "            self.scales[slot].zero_()",
        ["tests/test_contracts.py", "-k", "unloaded_slot_reads_nothing and torch"],
        "unload leaves the slot's rank: an unloaded slot still computes (with zero weights) and passes checks",
    ),
    M(
        "serving/load-padding-not-zeroed",
        "lora_kernels/pool.py",
        "            self.A_stack[slot].zero_()\n            self.B_stack[slot].zero_()\n"
        "            offs = self.slice_offsets",
        "            offs = self.slice_offsets",
        ["tests/test_multi_lora.py", "-k", "load_unload_reload and torch"],
        "a reused slot keeps the previous tenant's padding",
    ),
]


# ------------------------------------------------------------------------------------------------------ machinery
def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "build", "*.egg-info", ".benchmarks", "out")
    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)


def _run_tests(tree: Path, tests: Sequence[str], timeout: float) -> tuple[str, float, str]:
    """(status, seconds, tail of the output) of one pytest run in ``tree``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TRITON_INTERPRET", "0" if _has_cuda() else "1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, ""
    secs = time.monotonic() - start
    tail = (proc.stdout + proc.stderr)[-1500:]
    if proc.returncode == 0:
        return "passed", secs, tail
    if proc.returncode == 1 or proc.returncode < 0 or proc.returncode > 5:
        return "failed", secs, tail  # test failures, or a crash (signal / abort)
    return "error", secs, tail  # 2 interrupted, 3 internal error, 4 usage error, 5 no tests collected


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover
        return False


def _select(args) -> list[Mutant]:
    chosen = MUTANTS
    if args.area:
        chosen = [m for m in chosen if m.area in args.area]
    if args.only:
        unknown = set(args.only) - {m.name for m in MUTANTS}
        if unknown:
            raise SystemExit(f"unknown mutants: {sorted(unknown)} (see --list)")
        chosen = [m for m in chosen if m.name in args.only]
    return chosen


def _stale(m: Mutant, text: str) -> str | None:
    n = text.count(m.old)
    return None if n == 1 else f"old text found {n} times"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument("--dry-run", action="store_true", help="only check that every old text is found once")
    ap.add_argument("--area", action="append", help="run only this area (repeatable)")
    ap.add_argument("--only", action="append", help="run only this mutant, by name (repeatable)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run (default 900)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    ap.add_argument("--keep", action="store_true", help="keep the temporary tree (its path is printed)")
    ap.add_argument("--verbose", action="store_true", help="print the end of each run's pytest output")
    args = ap.parse_args(argv)
    chosen = _select(args)

    if args.list:
        for m in chosen:
            print(f"{m.name:48s} {m.file:40s} {' '.join(m.tests)}\n    {m.why}")
        return 0

    sources: dict[str, str] = {}
    stale: dict[str, str] = {}
    for m in chosen:
        if m.file not in sources:
            sources[m.file] = (ROOT / m.file).read_text()
        why = _stale(m, sources[m.file])
        if why:
            stale[m.name] = why
    if args.dry_run:
        for m in chosen:
            print(f"{m.name:48s} {'STALE: ' + stale[m.name] if m.name in stale else 'ok'}")
        return 1 if stale else 0

    tmp = Path(tempfile.mkdtemp(prefix="lk_mutants_"))
    tree = tmp / "tree"
    _copy_tree(tree)
    print(f"tree copied to {tree}", flush=True)
    rows = []
    try:
        baseline: dict[tuple[str, ...], str] = {}
        if not args.no_baseline:
            for tests in dict.fromkeys(
                m.tests for m in chosen if m.name not in stale and not (m.gpu and not _has_cuda())
            ):
                status, secs, tail = _run_tests(tree, tests, args.timeout)
                baseline[tests] = status
                print(f"baseline {' '.join(tests)}: {status} ({secs:.0f} s)", flush=True)
                if status != "passed":
                    print(tail, flush=True)
        for m in chosen:
            if m.name in stale:
                rows.append((m, "stale", 0.0, stale[m.name]))
                continue
            if m.gpu and not _has_cuda():
                rows.append((m, "needs GPU", 0.0, ""))
                continue
            if baseline.get(m.tests, "passed") != "passed":
                rows.append((m, "baseline fails", 0.0, ""))
                continue
            target = tree / m.file
            target.write_text(sources[m.file].replace(m.old, m.new, 1))
            try:
                status, secs, tail = _run_tests(tree, m.tests, args.timeout)
            finally:
                target.write_text(sources[m.file])
            result = {"failed": "caught", "passed": "MISSED", "timeout": "timeout", "error": "error"}[status]
            rows.append((m, result, secs, tail if result == "error" else ""))
            print(f"{m.name}: {result} ({secs:.0f} s)", flush=True)
            if args.verbose:
                print(tail, flush=True)
    finally:
        if args.keep:
            print(f"kept {tree}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"| {'mutant':46s} | {'result':14s} | {'s':>5s} | bug |")
    print(f"|{'-' * 48}|{'-' * 16}|{'-' * 7}|-----|")
    for m, result, secs, _ in rows:
        print(f"| {m.name:46s} | {result:14s} | {secs:5.0f} | {m.why} |")
    caught = sum(r[1] in ("caught", "timeout") for r in rows)
    missed = sum(r[1] == "MISSED" for r in rows)
    other = [r for r in rows if r[1] not in ("caught", "timeout", "MISSED", "needs GPU")]
    total = caught + missed
    no_gpu = sum(r[1] == "needs GPU" for r in rows)
    print(
        f"\nscore: {caught}/{total} caught"
        + (f" ({100.0 * caught / total:.0f}%)" if total else "")
        + (f"; {len(other)} not scored (stale / error / baseline fails)" if other else "")
        + (f"; {no_gpu} need a GPU" if no_gpu else "")
    )
    for m, result, _, detail in other:
        if detail:
            print(f"\n{m.name} ({result}):\n{detail}")
    return 0 if missed == 0 and not other else 1


if __name__ == "__main__":
    sys.exit(main())
