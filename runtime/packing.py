"""Sparse packing: reference latent grids -> kept tokens with their original FLUX.2 positions.

Works on numpy arrays (the runtime) and on torch tensors (the PyTorch reference) alike: only reshape,
transpose, fancy indexing and concatenation are used, dispatched on the array type. With every token kept
the result equals diffusers' ``Flux2KleinPipeline.prepare_image_latents`` (tokens and ids), which a test checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sparse_context.runtime.errors import SelectionError, bad_value
from sparse_context.runtime.tokens import (
    POSITION_AXES, check_reference_count, grid_position_ids, reference_time,
)


def _torch_cat(parts: Sequence[Any]) -> Any:
    import torch  # only reached with torch inputs

    return torch.cat(list(parts), dim=0)


def pack_grid(latent_grid: Any) -> Any:
    """(C, rows, cols) -> (rows*cols, C) row-major tokens, as diffusers ``_pack_latents`` orders them."""
    channels = latent_grid.shape[0]
    return latent_grid.reshape(channels, -1).T  # (rows*cols, C)


def unpack_grid(tokens: Any, rows: int, cols: int) -> Any:
    """(rows*cols, C) -> (C, rows, cols), the inverse of :func:`pack_grid` for a full target grid."""
    return tokens.T.reshape(tokens.shape[1], rows, cols)  # (C, rows, cols)


def check_indices(indices: np.ndarray, available: int, reference: int) -> np.ndarray:
    """Sorted unique int64 indices in [0, available), or SelectionError."""
    indices = np.sort(np.asarray(indices, dtype=np.int64).reshape(-1))  # (K,)
    if indices.size and (indices[0] < 0 or indices[-1] >= available):
        raise SelectionError(
            bad_value(f"token indices of reference {reference}", f"range [{indices[0]}, {indices[-1]}]",
                      f"indices in [0, {available}) for its {available}-token grid")
        )
    if np.any(indices[1:] == indices[:-1]):  # sorted: a repeat sits next to itself
        raise SelectionError(bad_value(f"token indices of reference {reference}", "repeated indices", "unique indices"))
    return indices


@dataclass(frozen=True)
class PackedReferences:
    """Kept reference tokens in reference order, each reference's tokens in row-major grid order."""

    tokens: Any  # (N_kept, C) numpy array (C-contiguous) or torch tensor
    position_ids: np.ndarray  # (N_kept, 4) int64 (t, h, w, l)
    counts: tuple[int, ...]  # kept tokens per reference
    grids: tuple[tuple[int, int], ...]  # (rows, cols) per reference

    @property
    def num_tokens(self) -> int:
        return int(sum(self.counts))

    @property
    def available(self) -> int:
        return int(sum(rows * cols for rows, cols in self.grids))


def pack_references(latent_grids: Sequence[Any], kept_indices: Sequence[np.ndarray] | None = None) -> PackedReferences:
    """Pack reference latents (each (C, rows, cols)) keeping ``kept_indices[i]`` (flat row-major) of reference i.

    ``kept_indices=None`` keeps every token. Position ids keep the original (h, w) of each token and
    t = 10 + 10*i, so a sparse subset sits exactly where it would in the dense sequence.
    """
    check_reference_count(len(latent_grids))
    if kept_indices is not None and len(kept_indices) != len(latent_grids):
        raise SelectionError(
            bad_value("token selections", f"{len(kept_indices)} selections", f"one per reference ({len(latent_grids)})")
        )
    grids = [(int(grid.shape[-2]), int(grid.shape[-1])) for grid in latent_grids]
    if not grids:
        return PackedReferences(tokens=None, position_ids=np.zeros((0, 4), np.int64), counts=(), grids=())
    keeps = [None if kept_indices is None else check_indices(kept_indices[index], rows * cols, index)
             for index, (rows, cols) in enumerate(grids)]
    counts = [rows * cols if keep is None else keep.size for (rows, cols), keep in zip(grids, keeps)]
    ids = np.concatenate([_position_ids(rows, cols, index, keep) for index, ((rows, cols), keep)
                          in enumerate(zip(grids, keeps))])  # (N_kept, 4)
    if all(isinstance(grid, np.ndarray) for grid in latent_grids):
        tokens = _pack_numpy(latent_grids, keeps, counts)
    else:
        tokens = _torch_cat([pack_grid(grid) if keep is None else pack_grid(grid)[_as_torch_index(keep, grid)]
                             for grid, keep in zip(latent_grids, keeps)])
    return PackedReferences(tokens=tokens, position_ids=ids, counts=tuple(counts), grids=tuple(grids))


def _position_ids(rows: int, cols: int, index: int, keep: np.ndarray | None) -> np.ndarray:
    """(K, 4) ids of the kept tokens of reference ``index``: ``grid_position_ids(...)[keep]``, built directly."""
    if keep is None:
        return grid_position_ids(rows, cols, time=reference_time(index))  # (rows*cols, 4)
    ids = np.zeros((keep.size, POSITION_AXES), dtype=np.int64)  # (K, 4)
    ids[:, 0] = reference_time(index)
    ids[:, 1], ids[:, 2] = np.divmod(keep, cols)
    return ids


def _pack_numpy(latent_grids: Sequence[np.ndarray], keeps: Sequence[np.ndarray | None], counts: Sequence[int]):
    """Kept tokens of numpy grids written straight into one C-contiguous (N_kept, C) array: no per-reference
    copies to concatenate, and none later for an engine input, which wants (1, N_kept, C) C-contiguous."""
    channels = latent_grids[0].shape[0]
    tokens = np.empty((sum(counts), channels), dtype=np.result_type(*latent_grids))  # (N_kept, C)
    start = 0
    for grid, keep, count in zip(latent_grids, keeps, counts):
        flat = grid.reshape(grid.shape[0], -1)  # (C, rows*cols)
        # Gather along the contiguous axis of (C, rows*cols), then transpose: indexing rows of the
        # transposed view reads one float per cache line and took 3x as long for 6 x 410 tokens.
        tokens[start:start + count] = (flat if keep is None else np.take(flat, keep, axis=1)).T  # (K, C)
        start += count
    return tokens


def _as_torch_index(indices: np.ndarray, like: Any) -> Any:
    import torch

    return torch.from_numpy(indices).to(like.device)
