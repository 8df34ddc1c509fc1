"""New values that do not depend on how a tensor is split: ``normal(0, std)`` drawn per block.

The rows of a tensor are cut into fixed blocks (about 64K elements each, a function of the
tensor's shape alone); each block is drawn from its own generator, seeded by a hash of
``(seed, key, block)``. Any box of the tensor (a rank's shard, or the whole tensor in one process)
is then the same values: a sharded load at any world size equals a one-process load with the
same seed. ``seed`` is ``init_seed``, or one number drawn from torch's default generator
(:func:`default_seed`), so ``torch.manual_seed(s)`` before a load reproduces it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

__all__ = ["BLOCK_ELEMENTS", "Box", "default_seed", "normal_box"]

BLOCK_ELEMENTS = 1 << 16

# a box: (start, stop) per dimension, in the tensor's global coordinates
Box = tuple[tuple[int, int], ...]


def default_seed() -> int:
    """One number from torch's default generator (advances it by one draw)."""
    return int(torch.empty((), dtype=torch.int64).random_())


def normal_box(
    key: str, shape: Sequence[int], box: Box, std: float, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    """The values of ``box`` in the tensor ``key`` of ``shape`` drawn from ``normal(0, std)``
    block by block (see the module docstring), in ``dtype`` (a floating dtype)."""
    shape = tuple(shape)
    out_shape = tuple(stop - start for start, stop in box)
    if math.prod(out_shape) == 0:  # an empty shard: nothing to draw
        return torch.empty(out_shape, dtype=dtype)
    if not shape:  # 0-d: one value, one block
        return torch.empty((), dtype=dtype).normal_(0.0, std, generator=_generator(seed, key, 0))
    rest = math.prod(shape[1:])
    rows = max(1, BLOCK_ELEMENTS // max(rest, 1))  # rows per block: the shape's, not the box's
    (first, last), inner = box[0], tuple(slice(a, b) for a, b in box[1:])
    out = torch.empty(out_shape, dtype=dtype)
    for block in range(first // rows, (last - 1) // rows + 1):
        start, stop = block * rows, min(shape[0], (block + 1) * rows)
        drawn = torch.empty((stop - start, *shape[1:]), dtype=dtype)
        drawn.normal_(0.0, std, generator=_generator(seed, key, block))
        lo, hi = max(start, first), min(stop, last)
        out[lo - first : hi - first] = drawn[(slice(lo - start, hi - start),) + inner]
    return out


def _generator(seed: int, key: str, block: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}\0{key}\0{block}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
