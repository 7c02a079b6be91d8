"""The multi-adapter batch as every backend's launcher takes it: :class:`BatchMeta`, the four device tensors of a
:class:`lora_kernels.LoRABatch`, and :func:`max_tiles`, the bound of the launch grid over its work list.

A leaf (torch only): the pool, the ops, the Triton launchers and the CUDA extension's wrappers all import it. See
docs/multi_lora.md ("Batch layout").
"""

from __future__ import annotations

from typing import NamedTuple

import torch


def max_tiles(M: int, L: int, tile_m: int, capacity: int) -> int:
    """Launch-grid bound of a batch of ``capacity`` entries cut into tiles of ``tile_m`` rows: the tiles that cover
    tokens ``< M`` of slots ``< L`` come first in ``tile_starts`` (tiles of slots ``>= L``, of tokens ``>= M`` or of no
    adapter come later or do not exist) and number at most ``cdiv(M, tile_m) + min(M, L)`` (full tiles plus one
    partial tile per slot used), never more than the tokens. Host ints only, so a captured grid stays valid for any
    ids."""
    return max(1, min(capacity, M, -(-M // tile_m) + min(M, L)))


class BatchMeta(NamedTuple):
    """The device tensors of a :class:`lora_kernels.LoRABatch` that the kernels read, all int32 of the batch's
    capacity ``cap`` (see ``LoRABatch`` for how they are built):

    - ``token_slots [cap]``: the slot of each token, -1 = no adapter (may hold any value: kernels check it).
    - ``sorted_tokens [cap]``: token indices stably sorted by slot.
    - ``sorted_slots [cap]``: the slot of each entry of ``sorted_tokens`` (``2^31-1`` = no adapter).
    - ``tile_starts [cap + 1]``: where each tile of up to ``tile_m`` same-slot entries starts in the sorted list,
      -1 past the last tile.

    torch.library custom ops take tensors, not records: the ops pass ``*meta`` and rebuild the record in their
    bodies. The CUDA extension's wrappers also accept None for the last three (per-token kernels only)."""

    token_slots: torch.Tensor
    sorted_tokens: torch.Tensor
    sorted_slots: torch.Tensor
    tile_starts: torch.Tensor

    @property
    def capacity(self) -> int:
        """Entries of the sorted list (the batch's ``max_tokens``)."""
        return self.sorted_tokens.shape[0]

    def max_tiles(self, M: int, L: int, tile_m: int) -> int:
        """:func:`max_tiles` of this batch."""
        return max_tiles(M, L, tile_m, self.capacity)
