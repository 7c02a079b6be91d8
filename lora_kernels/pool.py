"""Serving state: :class:`AdapterPool` (one layer's preallocated adapter stacks, ``A_stack [L, S·R, K]``,
``B_stack [L, N, R]``, ``ranks``, ``scales``) and :class:`LoRABatch` (each token's slot, sorted once per step into a
work list of same-adapter tiles shared by every layer). Bookkeeping only; the math is in
:mod:`lora_kernels.ops.multi_lora`. Layouts and the rules they guarantee: docs/multi_lora.md.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections.abc import Iterable, Sequence

import torch

from .ops._batch import BatchMeta, max_tiles
from .ops._validate import FLOAT_DTYPES, MAX_SLICES, shape

TensorOrList = torch.Tensor | Sequence[torch.Tensor]

# Guards the in-flight counts of every pool (below) together with unload, across threads: an adapter is never
# unloaded (and its slot never handed to another tenant) while a request in progress uses it.
IN_FLIGHT_LOCK = threading.RLock()
_UNKNOWN = -2  # in-flight key of a batch whose ids live on the device: it may use any slot


def hold_slots(pools: Iterable[AdapterPool], slots: Iterable[int] | None) -> list[tuple[AdapterPool, list]]:
    """Count ``slots`` (None: unknown, any slot) of every pool as used by a request in progress, until
    :func:`release_slots`; :meth:`AdapterPool.unload` refuses those slots meanwhile. Returns the token to release."""
    keys = [_UNKNOWN] if slots is None else sorted({int(s) for s in slots if s >= 0})
    held = []
    if not keys:
        return held
    with IN_FLIGHT_LOCK:
        for pool in pools:
            counts = pool._in_flight
            for k in keys:
                counts[k] = counts.get(k, 0) + 1
            held.append((pool, keys))
    return held


def release_slots(held: list[tuple[AdapterPool, list]]) -> None:
    with IN_FLIGHT_LOCK:
        for pool, keys in held:
            counts = pool._in_flight
            for k in keys:
                n = counts.get(k, 0) - 1
                if n > 0:
                    counts[k] = n
                else:
                    counts.pop(k, None)


def _as_float_list(name: str, value, n: int) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} entries but the pool has {n} output slices")
        items = list(value)
    else:
        items = [value] * n
    if any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in items):
        raise TypeError(f"{name} must be a real number or a list of one per slice, got {value!r}")
    vals = [float(v) for v in items]
    for v in vals:
        if not math.isfinite(v):
            raise ValueError(f"{name} must be finite, got {value!r}")
    return vals


class AdapterPool:
    """Preallocated stacks holding up to ``max_adapters`` LoRA adapters of one linear layer (see the module docstring
    for the layout).

    ``out_features`` is an int, or a list of widths for a fused projection (``[q, k, v]``, ``[gate, up]``): one output
    slice per entry, each with its own A and B per adapter. Adapters of any rank ``1..max_rank`` share the pool.
    """

    def __init__(
        self,
        max_adapters: int,
        max_rank: int,
        in_features: int,
        out_features: int | Sequence[int],
        dtype: torch.dtype | None = None,
        device=None,
    ):
        for name, v in (("max_adapters", max_adapters), ("max_rank", max_rank), ("in_features", in_features)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(out_features, int) and not isinstance(out_features, bool):
            slices = (out_features,)
        elif isinstance(out_features, (list, tuple)):
            slices = tuple(out_features)
        else:
            slices = ()
        if not slices or any(not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in slices):
            raise ValueError(f"out_features must be a positive int or a non-empty list of them, got {out_features!r}")
        if len(slices) > MAX_SLICES:
            raise ValueError(f"out_features has {len(slices)} slices; at most {MAX_SLICES} are supported")
        dtype = torch.get_default_dtype() if dtype is None else dtype
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {', '.join(map(str, FLOAT_DTYPES))}, got {dtype!r}")
        self.max_adapters = max_adapters
        self.max_rank = max_rank
        self.in_features = in_features
        self.slices = slices
        self.out_features = sum(slices)
        self.dtype = dtype
        L, R, S = max_adapters, max_rank, len(slices)
        factory = {"dtype": dtype, "device": device}
        self.A_stack = torch.zeros(L, S * R, in_features, **factory)
        self.B_stack = torch.zeros(L, self.out_features, R, **factory)
        self.ranks = torch.zeros(L, dtype=torch.int32, device=device)
        self.scales = torch.zeros(L, S, dtype=torch.float32, device=device)
        self._host_ranks = [0] * L
        self._slot_of: dict[str, int] = {}
        self._in_use = [False] * L  # kept in step with _slot_of: the eager id check reads it on every call
        self._in_flight: dict[int, int] = {}  # slot (or _UNKNOWN) -> requests in progress using it (hold_slots)

    def __getstate__(self):
        # A copy (deepcopy, pickle) serves no request yet: it starts with no slot in flight.
        state = dict(self.__dict__)
        state["_in_flight"] = {}
        return state

    def __setstate__(self, state):
        state.setdefault("_in_flight", {})
        self.__dict__.update(state)

    # ------------------------------------------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.A_stack.device

    @property
    def num_slices(self) -> int:
        return len(self.slices)

    @property
    def slice_offsets(self) -> list[int]:
        """``[0, N_0, N_0 + N_1, …, N]``."""
        offs = [0]
        for n in self.slices:
            offs.append(offs[-1] + n)
        return offs

    @property
    def B_slices(self) -> list[torch.Tensor]:
        """Per-slice B stacks ``[L, N_s, R]`` (views into ``B_stack``)."""
        offs = self.slice_offsets
        return [self.B_stack[:, offs[i] : offs[i + 1]] for i in range(self.num_slices)]

    @property
    def names(self) -> dict[str, int]:
        """Loaded adapters: name → slot (a copy)."""
        return dict(self._slot_of)

    @property
    def host_ranks(self) -> list[int]:
        """Rank of each slot (0 = empty or reserved), kept on the host so id checks need no device sync."""
        return list(self._host_ranks)

    @property
    def slots_in_use(self) -> list[bool]:
        """Per slot: does a name hold it (loaded, or reserved by :meth:`reserve`)? Those are the valid batch ids."""
        return list(self._in_use)

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, name: str) -> bool:
        return name in self._slot_of

    def slot_of(self, name: str) -> int:
        """The slot of a loaded adapter (the id to put in a :class:`LoRABatch`)."""
        try:
            return self._slot_of[name]
        except KeyError:
            loaded = ", ".join(sorted(self._slot_of)) or "(none)"
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {loaded}") from None

    def free_slots(self) -> list[int]:
        used = self.slots_in_use
        return [i for i in range(self.max_adapters) if not used[i]]

    def __repr__(self) -> str:
        return (
            f"AdapterPool(max_adapters={self.max_adapters}, max_rank={self.max_rank}, in_features={self.in_features}, "
            f"out_features={list(self.slices) if self.num_slices > 1 else self.slices[0]}, dtype={self.dtype}, "
            f"device={self.device}, loaded={len(self)})"
        )

    # ------------------------------------------------------------------------------------------------ load/unload
    def _per_slice(self, what: str, t: TensorOrList, split_rows: bool) -> list[torch.Tensor]:
        S = self.num_slices
        if isinstance(t, torch.Tensor):
            if S == 1:
                return [t]
            if not split_rows:
                return [t] * S  # one lora_A shared by every slice (a LoRA on a fused projection)
            if t.dim() != 2 or t.shape[0] != self.out_features:
                raise ValueError(
                    f"{what} must be [out_features={self.out_features}, r] (or a list of {S} per-slice tensors), "
                    f"got {shape(t)}"
                )
            return list(torch.split(t, list(self.slices), dim=0))
        parts = list(t)
        if len(parts) != S:
            raise ValueError(f"{what} is a list of {len(parts)} tensors but the pool has {S} output slices")
        return parts

    def load(
        self,
        name: str,
        lora_A: TensorOrList,
        lora_B: TensorOrList,
        alpha: None | float | Sequence[float] = None,
        use_rslora: bool = False,
        scale: None | float | Sequence[float] = None,
        slot: int | None = None,
    ) -> int:
        """Copy an adapter into a free slot and return the slot.

        ``lora_A [r, K]`` and ``lora_B [N, r]`` (PEFT's ``lora_A.weight`` / ``lora_B.weight``). For a sliced pool,
        lists of one ``[r_s, K]`` and one ``[N_s, r_s]`` per slice (ranks may differ per slice: each is zero-padded to
        the largest, which is exact); a single ``lora_A`` is shared by every slice and a single ``lora_B [N, r]`` is
        split by the slice widths. Scale per slice: ``scale`` if given, else ``alpha/r_s`` (``alpha/√r_s`` with
        ``use_rslora``), ``alpha`` defaulting to ``r_s`` (scale 1). ``slot``: a specific free slot (so that every layer
        of a model can use the same slot for one adapter); default the lowest free one.

        Raises (and leaves the pool unchanged) when the name is taken, a shape or dtype is wrong, a rank is 0 or above
        ``max_rank``, a value is not finite, or no slot is free.
        """
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if name in self._slot_of:
            raise ValueError(f"adapter {name!r} is already loaded in slot {self._slot_of[name]}; unload it first")
        K, R, S = self.in_features, self.max_rank, self.num_slices
        a_parts = self._per_slice("lora_A", lora_A, split_rows=False)
        b_parts = self._per_slice("lora_B", lora_B, split_rows=True)
        ranks = []
        for i, (a, b) in enumerate(zip(a_parts, b_parts)):
            tag = f"[slice {i}]" if S > 1 else ""
            for what, t in ((f"lora_A{tag}", a), (f"lora_B{tag}", b)):
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
                if t.dim() != 2:
                    raise ValueError(f"{what} must be 2-D, got shape {shape(t)}")
                if t.dtype not in FLOAT_DTYPES:
                    raise TypeError(f"{what} has dtype {t.dtype}; expected a float dtype")
                if t.layout != torch.strided or t.device.type == "meta":
                    raise ValueError(
                        f"{what} must be a dense tensor holding values, got a {t.layout} tensor on {t.device}"
                    )
            r = a.shape[0]
            if a.shape[1] != K:
                raise ValueError(f"lora_A{tag} must be [r, in_features={K}], got {shape(a)}")
            if r == 0 or r > R:
                raise ValueError(f"lora_A{tag} has rank {r}; this pool holds ranks 1..max_rank={R}")
            if b.shape != (self.slices[i], r):
                raise ValueError(f"lora_B{tag} must be [out_features={self.slices[i]}, r={r}], got {shape(b)}")
            if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
                raise ValueError(f"adapter {name!r}{tag} contains inf or NaN")
            if not (torch.isfinite(a.to(self.dtype)).all() and torch.isfinite(b.to(self.dtype)).all()):
                raise ValueError(f"adapter {name!r}{tag} overflows the pool's dtype {self.dtype}")
            ranks.append(r)
        rank = max(ranks)
        if scale is not None:
            scales = _as_float_list("scale", scale, S)
        else:
            alphas = [float(r) for r in ranks] if alpha is None else _as_float_list("alpha", alpha, S)
            scales = [al / (math.sqrt(r) if use_rslora else r) for al, r in zip(alphas, ranks)]
        slot = self._pick_slot(slot)
        # Every check passed: write. Padding is zeroed so that nothing of a previous tenant remains in the slot.
        with torch.no_grad():
            self.A_stack[slot].zero_()
            self.B_stack[slot].zero_()
            offs = self.slice_offsets
            for i, (a, b) in enumerate(zip(a_parts, b_parts)):
                r = a.shape[0]
                self.A_stack[slot, i * R : i * R + r].copy_(a)
                self.B_stack[slot, offs[i] : offs[i + 1], :r].copy_(b)
            self.scales[slot].copy_(torch.tensor(scales, dtype=torch.float32))
            self.ranks[slot] = rank
        self._host_ranks[slot] = rank
        self._slot_of[name] = slot
        self._in_use[slot] = True
        return slot

    def _pick_slot(self, slot: int | None) -> int:
        if slot is None:
            free = self.free_slots()
            if not free:
                raise RuntimeError(
                    f"the pool is full: all {self.max_adapters} slots hold adapters "
                    f"({', '.join(sorted(self._slot_of))}); unload one first"
                )
            return free[0]
        if not isinstance(slot, int) or isinstance(slot, bool) or not 0 <= slot < self.max_adapters:
            raise ValueError(f"slot must be an int in [0, {self.max_adapters}), got {slot!r}")
        holder = next((n for n, s in self._slot_of.items() if s == slot), None)
        if holder is not None:
            raise ValueError(f"slot {slot} already holds adapter {holder!r}")
        return slot

    def reserve(self, name: str, slot: int | None = None) -> int:
        """Register ``name`` in a slot without weights (rank 0): tokens of that slot get the base output here at no
        cost, and pass the id check. For an adapter that does not target this layer while it targets others of the
        model, so that one slot id serves the whole model."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"name must be a non-empty str, got {name!r}")
        if name in self._slot_of:
            raise ValueError(f"adapter {name!r} is already loaded in slot {self._slot_of[name]}; unload it first")
        slot = self._pick_slot(slot)
        self._slot_of[name] = slot
        self._in_use[slot] = True
        return slot

    def unload(self, name: str) -> int:
        """Free the adapter's slot (rank set to 0, its weights zeroed) and return the slot. Refused (RuntimeError)
        while a request in progress in any thread uses the slot (:func:`lora_kernels.use_batch`, a forward with
        ``adapter_names``): its remaining layers would compute without the adapter, or with the next tenant's."""
        with IN_FLIGHT_LOCK:
            self.check_unloadable(name)
            return self._unload(name)

    def check_unloadable(self, name: str) -> int:
        """The adapter's slot; raises when it cannot be unloaded now (see :meth:`unload`)."""
        slot = self.slot_of(name)
        with IN_FLIGHT_LOCK:
            users = self._in_flight.get(slot, 0) + self._in_flight.get(_UNKNOWN, 0)
        if users:
            raise RuntimeError(
                f"adapter {name!r} (slot {slot}) is used by {users} request(s) in progress "
                "(use_batch or a forward with adapter_names); unload it once they are done"
            )
        return slot

    def _unload(self, name: str) -> int:
        """Unload without the in-flight check: only to undo a load that has not served yet."""
        slot = self.slot_of(name)
        with torch.no_grad():
            self.ranks[slot] = 0
            self.scales[slot].zero_()
            self.A_stack[slot].zero_()
            self.B_stack[slot].zero_()
        self._host_ranks[slot] = 0
        del self._slot_of[name]
        self._in_use[slot] = False
        return slot


# ------------------------------------------------------------------------------------------------------- the batch
_NONE_KEY = torch.iinfo(torch.int32).max  # sort key of "no adapter": after every real slot, so it makes no tile
_INT32_MIN, _INT32_MAX = torch.iinfo(torch.int32).min, torch.iinfo(torch.int32).max
_INT64_MAX = torch.iinfo(torch.int64).max
# Integer dtypes accepted as ids (the unsigned ones beyond uint8 exist from torch 2.3 on).
_UINT64 = getattr(torch, "uint64", None)
_ID_DTYPES = tuple(
    d
    for d in (
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
        getattr(torch, "uint16", None),
        getattr(torch, "uint32", None),
        _UINT64,
    )
    if d is not None
)


def mean_tile_adapters(slots: torch.Tensor, L: int, rows: int) -> float:
    """Mean number of distinct adapters (values in [0, L)) per ``rows``-row tile of the host ids ``slots`` taken in
    their own order (the row tiles of a GEMM over the batch's tokens as they come); 0.0 for no ids."""
    M = slots.numel()
    if M == 0:
        return 0.0
    tiles = -(-M // rows)
    s = torch.full((tiles * rows,), -1, dtype=torch.int64)
    s[:M] = slots.reshape(-1).to(torch.int64)
    s = torch.where((s >= 0) & (s < L), s, torch.full_like(s, -1)).view(tiles, rows).sort(dim=1).values
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    return float((first & (s >= 0)).sum()) / tiles


def auto_tile_m(max_tokens: int) -> int:
    """Rows per tile for a batch of this capacity. 16 (the smallest tl.dot M) while batches are decode-sized: the
    tokens of one adapter are few, so bigger tiles would be mostly masked rows. Larger batches (prefill) get larger
    tiles, so fewer programs re-read each adapter's A and B (one read per tile). Thresholds are a first guess, not
    yet tuned on a GPU."""
    if max_tokens <= 256:
        return 16
    if max_tokens <= 1024:
        return 32
    return 64


class LoRABatch:
    """Which pool slot each token of one step uses, prepared once and shared by every layer.

    Device buffers of fixed capacity ``max_tokens`` (so a CUDA graph captured once stays valid after
    :meth:`prepare_` refills them in place):

    - ``token_slots [cap]`` int32: the slot of each token, ``-1`` = no adapter (entries past the batch are -1).
    - ``sorted_tokens [cap]`` int32: token indices stably sorted by slot ("no adapter" last).
    - ``sorted_slots [cap]`` int32: the slot of each entry of ``sorted_tokens`` (``2^31-1`` for no adapter).
    - ``tile_starts [cap + 1]`` int32: work list. Entry ``t`` is the position in ``sorted_tokens`` where tile ``t``
      starts; a tile is up to ``tile_m`` consecutive sorted tokens of one slot; ``-1`` past the last tile. Kernels
      launch one program per tile (times output blocks), so the grid follows the real work, not tokens × adapters.
      The last entry is scratch for the construction.

    :attr:`meta` hands these four to the kernels as one :class:`lora_kernels.ops._batch.BatchMeta` record.

    Host side: ``num_tokens``; ``host_slots`` and ``host_unique`` (the ids as a CPU tensor, and their distinct values,
    when they were given on the host, else None) and ``has_adapter`` (False when no token names an adapter, None when
    unknown) let an eager call skip the LoRA kernels and validate ids without a device sync.

    ``max_adapters_per_step`` (None = no promise) is the most distinct adapters one step will name, as serving
    engines bound the LoRAs of a batch: with it (or, outside CUDA graphs and torch.compile, with ids given on the
    host), steps of few adapters and few tokens run the gemm path in one launch (see docs/multi_lora.md, "One launch
    for few adapters"). Only speed depends on it: a step that names more still gets exact results (host ids that
    break the promise raise ValueError at :meth:`prepare_`, before anything changes).

    Slot ids are validated against a pool by the ops (``check=True``); the kernels additionally treat any id that is
    negative, ``>= L`` or names an empty slot as "no adapter", so a bad id can never read outside the pool.
    """

    def __init__(
        self, max_tokens: int, device=None, tile_m: int | None = None, max_adapters_per_step: int | None = None
    ):
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if tile_m is None:
            tile_m = auto_tile_m(max_tokens)
        if tile_m not in (16, 32, 64, 128):
            raise ValueError(f"tile_m must be one of 16, 32, 64, 128 (tl.dot needs >= 16 rows), got {tile_m!r}")
        if max_adapters_per_step is not None and (
            isinstance(max_adapters_per_step, bool)
            or not isinstance(max_adapters_per_step, int)
            or max_adapters_per_step < 1
        ):
            raise ValueError(f"max_adapters_per_step must be a positive int or None, got {max_adapters_per_step!r}")
        self.max_adapters_per_step = max_adapters_per_step
        device = torch.device("cpu") if device is None else torch.device(device)
        cap = max_tokens
        self.capacity = cap
        self.tile_m = tile_m
        i32 = {"dtype": torch.int32, "device": device}
        self.token_slots = torch.full((cap,), -1, **i32)
        self.sorted_tokens = torch.arange(cap, **i32)
        self.sorted_slots = torch.full((cap,), _NONE_KEY, **i32)
        self.tile_starts = torch.full((cap + 1,), -1, **i32)
        self._positions = torch.arange(cap, dtype=torch.int64, device=device)
        self.num_tokens = 0
        self.host_slots: torch.Tensor | None = torch.empty(0, dtype=torch.int64)
        self.host_unique: list[int] | None = []
        self.has_adapter: bool | None = False
        self._tile_adapters: dict[tuple[int, int], float] = {}  # (L, rows) -> tile_adapters(), for these host ids

    @property
    def device(self) -> torch.device:
        return self.token_slots.device

    @property
    def meta(self) -> BatchMeta:
        """The four device tensors the kernels read, as one record."""
        return BatchMeta(self.token_slots, self.sorted_tokens, self.sorted_slots, self.tile_starts)

    @property
    def step_adapters(self) -> int | None:
        """At most how many distinct adapters this step names: counted when the ids were given on the host, else
        the ``max_adapters_per_step`` promise, else None (unknown)."""
        if self.host_unique is not None:
            return sum(1 for s in self.host_unique if s >= 0)
        return self.max_adapters_per_step

    def tile_adapters(self, L: int, rows: int) -> float | None:
        """Mean number of distinct adapters (slots in [0, L)) per ``rows``-row tile of the host ids in their own order
        (:func:`mean_tile_adapters`), or None when the ids were given on a device. Computed once per ``prepare_``
        and (L, rows): every layer of a step asks it."""
        if self.host_slots is None:
            return None
        key = (L, rows)
        if key not in self._tile_adapters:
            self._tile_adapters[key] = mean_tile_adapters(self.host_slots, L, rows)
        return self._tile_adapters[key]

    def max_tiles(self, M: int, L: int) -> int:
        """Launch-grid bound for M tokens on L slots (see :func:`lora_kernels.ops._batch.max_tiles`)."""
        return max_tiles(M, L, self.tile_m, self.capacity)

    @classmethod
    def prepare(
        cls,
        adapter_ids,
        max_tokens: int | None = None,
        device=None,
        tile_m: int | None = None,
        max_adapters_per_step: int | None = None,
    ) -> LoRABatch:
        """A new batch for ``adapter_ids`` (pool slots, one per token, -1 = none): a list of ints or an integer
        tensor. ``max_tokens`` (capacity, default the number of ids) bounds later :meth:`prepare_` calls; ``device``
        defaults to the ids' device (CPU for a list). ``tile_m``: rows per work tile (the kernels' BLOCK_M; default
        :func:`auto_tile_m` of the capacity). ``max_adapters_per_step``: see the class."""
        ids = cls._as_tensor(adapter_ids)
        if device is None:
            device = ids.device
        cap = ids.numel() if max_tokens is None else max_tokens
        if cap == 0:
            cap = 1
        batch = cls(cap, device=device, tile_m=tile_m, max_adapters_per_step=max_adapters_per_step)
        return batch.prepare_(ids)

    @classmethod
    def prepare_sequences(
        cls,
        sequence_slots: Sequence[int],
        tokens_per_sequence: int | Sequence[int],
        max_tokens: int | None = None,
        device=None,
        tile_m: int | None = None,
        max_adapters_per_step: int | None = None,
    ) -> LoRABatch:
        """A batch where sequence ``b`` (``tokens_per_sequence`` tokens, an int for ``[B, S, K]`` inputs or one length
        per sequence for packed inputs) uses slot ``sequence_slots[b]`` (PEFT's per-sequence ``adapter_names``)."""
        slots = list(sequence_slots)
        if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in slots):
            raise TypeError(f"sequence_slots must be ints (pool slots, -1 = none), got {slots!r}")
        slots = [int(s) for s in slots]
        if isinstance(tokens_per_sequence, int):
            lengths = [tokens_per_sequence] * len(slots)
        else:
            lengths = list(tokens_per_sequence)
        if len(lengths) != len(slots) or any(not isinstance(n, int) or n < 0 for n in lengths):
            raise ValueError(
                f"tokens_per_sequence must be an int >= 0 or one per sequence ({len(slots)}), "
                f"got {tokens_per_sequence!r}"
            )
        ids = [s for s, n in zip(slots, lengths) for _ in range(n)]
        return cls.prepare(
            ids, max_tokens=max_tokens, device=device, tile_m=tile_m, max_adapters_per_step=max_adapters_per_step
        )

    @staticmethod
    def _as_tensor(adapter_ids) -> torch.Tensor:
        """The ids as an int64 tensor (same device), every value exact except uint64 ids ≥ 2^63, which become
        2^63 - 1: still out of range, never another slot."""
        if isinstance(adapter_ids, torch.Tensor):
            if adapter_ids.dtype not in _ID_DTYPES:
                raise TypeError(
                    f"adapter_ids must be an integer tensor ({', '.join(map(str, _ID_DTYPES))}), got "
                    f"dtype {adapter_ids.dtype}"
                )
            if adapter_ids.layout != torch.strided or adapter_ids.device.type == "meta":
                raise ValueError(
                    f"adapter_ids must be a dense tensor holding values, got a {adapter_ids.layout} "
                    f"tensor on {adapter_ids.device}"
                )
            ids = adapter_ids.reshape(-1)
            if ids.dtype == _UINT64:
                # Reinterpret the bits (a cast would wrap too): values ≥ 2^63 read negative and are saturated, so
                # 2^64 - 1 cannot turn into -1 nor 2^63 + 3 into anything in range.
                as_signed = ids.contiguous().view(torch.int64)
                return torch.where(as_signed < 0, torch.full_like(as_signed, _INT64_MAX), as_signed)
            return ids.to(torch.int64)
        if isinstance(adapter_ids, (str, bytes)) or not hasattr(adapter_ids, "__iter__"):
            raise TypeError(
                f"adapter_ids must be a sequence of ints or an integer tensor, got {type(adapter_ids).__name__}"
            )
        ids = list(adapter_ids)
        for i in ids:
            # numbers.Integral: numpy ints too (np.bool_ is not Integral; bool is, hence the explicit refusal).
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"adapter_ids must be ints (pool slots, -1 = none), got {i!r}")
            if not -(2**63) <= int(i) <= _INT64_MAX:
                raise ValueError(
                    f"adapter_ids holds {int(i)}, outside the int64 range; pool slots are 0 .. "
                    f"max_adapters - 1 and -1 means no adapter"
                )
        return torch.tensor([int(i) for i in ids], dtype=torch.int64)

    @staticmethod
    def _to_slots(ids: torch.Tensor) -> torch.Tensor:
        """int64 ids → the int32 ``token_slots`` values: anything outside int32 becomes -1 (no adapter) rather than
        wrapping (2^32 + 3 would be slot 3, another tenant's adapter), so the kernels never see it as a slot even with
        ``check=False`` or under torch.compile, where the eager id check is skipped."""
        in_range = (ids >= _INT32_MIN) & (ids <= _INT32_MAX)
        return torch.where(in_range, ids, torch.full_like(ids, -1)).to(torch.int32)

    @torch.no_grad()
    def prepare_(self, adapter_ids) -> LoRABatch:
        """Refill the buffers in place for new ids (same capacity and device): run it before replaying a CUDA graph
        captured with this batch. Runs a few small device ops; syncs only if ``adapter_ids`` is a device tensor being
        copied from another device."""
        ids = self._as_tensor(adapter_ids)
        n = ids.numel()
        cap = self.capacity
        if n > cap:
            raise ValueError(f"{n} adapter ids exceed this batch's capacity max_tokens={cap}")
        if ids.device.type == "cpu":
            host = ids  # int64, the values as given: the eager check names them
            unique = torch.unique(host).tolist()
            named = sum(1 for s in unique if s >= 0)
            if self.max_adapters_per_step is not None and named > self.max_adapters_per_step:
                raise ValueError(
                    f"the ids name {named} distinct adapters but this batch promised "
                    f"max_adapters_per_step={self.max_adapters_per_step}"
                )
            self.host_slots = host
            self.host_unique = unique
            self.has_adapter = bool((host >= 0).any()) if n else False
        else:
            self.host_slots = None
            self.host_unique = None
            self.has_adapter = None
        self._tile_adapters = {}
        self.num_tokens = n
        dev = self.device
        slots = self.token_slots
        slots.fill_(-1)
        if n:
            slots[:n].copy_(self._to_slots(ids).to(device=dev), non_blocking=True)
        # Negative ids mean "no adapter": sort them last so the tiles of real slots come first (ascending slot).
        keys = torch.where(slots < 0, torch.full_like(slots, _NONE_KEY), slots)
        sorted_keys, order = torch.sort(keys, stable=True)
        self.sorted_tokens.copy_(order)
        self.sorted_slots.copy_(sorted_keys)
        pos = self._positions
        new_seg = torch.ones(cap, dtype=torch.bool, device=dev)
        new_seg[1:] = sorted_keys[1:] != sorted_keys[:-1]
        seg_start = torch.cummax(torch.where(new_seg, pos, torch.zeros_like(pos)), dim=0).values
        real = sorted_keys != _NONE_KEY
        is_start = ((pos - seg_start) % self.tile_m == 0) & real
        tile_id = torch.cumsum(is_start.to(torch.int64), dim=0) - 1
        dest = torch.where(is_start, tile_id, torch.full_like(tile_id, cap))  # non-starts go to the scratch entry
        self.tile_starts.fill_(-1)
        self.tile_starts.scatter_(0, dest, pos.to(torch.int32))
        self.tile_starts[cap] = -1
        return self

    def __repr__(self) -> str:
        return (
            f"LoRABatch(num_tokens={self.num_tokens}, capacity={self.capacity}, tile_m={self.tile_m}, "
            f"max_adapters_per_step={self.max_adapters_per_step}, device={self.device})"
        )
