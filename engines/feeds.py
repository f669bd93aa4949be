"""The inputs of each engine call, named as the export spec names them: one builder for both engine backends.

TensorRT and onnxruntime bind memory differently, but what they feed must not differ: the same casts, the same
RoPE tables, the same zero-token placeholders. Inputs that stay the same for a whole generation (prompt, packed
references, RoPE tables) are built once and come back as the same array objects, so a backend can keep one device
copy per object (:class:`~sparse_context.runtime.memo.IdentityMemo`).

Some inputs also outlive the generation: RoPE tables depend only on the position ids, which repeat from image to
image at the same sizes (the text and target ids always, the reference ids while the selection holds), and an
application repeats prompts. At klein-9b these cost more host time than everything else the loop does (a 4,608 x 128
table pair takes ~7 ms of numpy, the cast of a 512-token prompt to float16 ~15 ms, on the 2-core development CPU).
Both are kept across generations (``lasting``): RoPE tables keyed by the ids' contents, prompt casts keyed by the
prompt array itself when it is read-only (``array.flags.writeable = False``, as the prompt cache hands them out), so
nothing that could change in place is ever reused. They come back as the same objects, and the backends keep their
device copies too.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from sparse_context.export.rope import rope_cos_sin
from sparse_context.export.spec import KV_INPUT_FAMILIES, KV_OUTPUT_FAMILIES, ModelDims, layer_name
from sparse_context.runtime.memo import IdentityMemo

STATIC_ENTRIES = 4  # per input: positive and negative prompt (guidance) and their RoPE tables, with room to spare
LASTING_BYTES = 256 << 20  # host arrays kept across generations (RoPE tables, prompt casts), least recent dropped
KV_INPUTS = KV_INPUT_FAMILIES  # (keys, values) families: one tensor per layer each (``cached_keys_0`` ...)
KV_OUTPUTS = KV_OUTPUT_FAMILIES


@dataclass(frozen=True)
class Empty:
    """A zero-token input: bound to any valid address with this shape (nothing is read)."""

    shape: tuple[int, ...]
    dtype: np.dtype


@dataclass(frozen=True)
class CallFeed:
    """Every input of one call except the K/V tensors, which live in the backend's buffers."""

    inputs: dict[str, np.ndarray | Empty]
    static: frozenset[str]  # inputs built once per generation (same object on every step)
    ref_tokens: int
    lasting: frozenset[str] = frozenset()  # static inputs that are also the same objects in later generations


class LastingArrays:
    """Host arrays kept across generations, least recently used dropped past ``max_bytes``. Entries hold what
    their keys refer to, so an identity key cannot be reused by a new object while its entry lives."""

    def __init__(self, max_bytes: int = LASTING_BYTES):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Any, tuple[Any, Any]] = OrderedDict()
        self.nbytes = self.hits = self.misses = 0

    def get(self, key: Any, held: Any, make: Callable[[], Any]) -> Any:
        if key in self._entries:
            self._entries.move_to_end(key)
            self.hits += 1
            return self._entries[key][1]
        self.misses += 1
        value = make()
        self._entries[key] = (held, value)
        self.nbytes += _nbytes(value)
        while self.nbytes > self.max_bytes and len(self._entries) > 1:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.nbytes -= _nbytes(dropped)
        return value

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0


class FeedBuilder:
    """Host arrays for the full and KV graphs, in the engine's precision (``dtype``); RoPE tables in float32."""

    def __init__(self, dims: ModelDims, dtype: Any):
        self.dims = dims
        self.dtype = np.dtype(dtype)
        self.memo = IdentityMemo(STATIC_ENTRIES)
        self.lasting = LastingArrays()

    def clear(self) -> None:
        """Forget this generation's static inputs (backends call this after each image); lasting ones stay."""
        self.memo.clear()

    def kv_shape(self, tokens: int) -> tuple[int, ...]:
        """A K/V state's stacked shape: its buffer holds every layer back to back."""
        d = self.dims
        return (d.num_layers, 1, int(tokens), d.heads, d.head_dim)  # (layers, 1, N_r, H, D)

    def kv_stride_tokens(self, tokens: int, itemsize: int, align: int = 1) -> int:
        """The tokens one layer of a K/V buffer spans: ``tokens``, rounded up so each layer starts ``align`` bytes
        aligned (TensorRT takes 256-byte aligned addresses only; a token of a real model is a multiple of 256
        bytes already, so only small test models round)."""
        row = self.dims.heads * self.dims.head_dim * int(itemsize)
        step = int(align) // math.gcd(row, int(align))  # tokens per aligned run of rows
        return -(-int(tokens) // step) * step

    def kv_layers(self, family: str, tokens: int, itemsize: int,
                  align: int = 1) -> list[tuple[str, int, tuple[int, ...]]]:
        """(tensor name, byte offset into the state's buffer, shape) of each layer's tensor of a K/V ``family``
        with ``tokens`` reference tokens: layer ``l`` of a ``(layers, 1, N, H, D)`` buffer starts ``l * N * H * D``
        elements in, so binding these views reads and writes the stacked layout without a copy (with ``align``,
        layers start every :meth:`kv_stride_tokens` tokens instead). 0 tokens: every layer at offset 0 (nothing is
        read or written)."""
        d = self.dims
        shape = (1, int(tokens), d.heads, d.head_dim)
        stride = self.kv_stride_tokens(tokens, itemsize, align) * d.heads * d.head_dim * int(itemsize)
        return [(layer_name(family, layer), layer * stride, shape) for layer in range(d.num_layers)]

    def full(self, target, target_ids, refs, ref_ids, text, text_ids, timestep) -> CallFeed:
        """The full graph: ``[text, target, refs]`` attend jointly; RoPE over the three id sets."""
        inputs = self._common(target, text, timestep)
        ref_tokens = _count(ref_ids, refs)
        if ref_tokens:
            inputs["refs"] = self._static("refs", refs)
            inputs["rope_cos"], inputs["rope_sin"] = self._rope("rope_full", text_ids, target_ids, ref_ids)
        else:
            inputs["refs"] = Empty((1, 0, self.dims.in_channels), self.dtype)
            inputs["rope_cos"], inputs["rope_sin"] = self._rope("rope_full", text_ids, target_ids)
        static = frozenset({"text", "refs", "rope_cos", "rope_sin"})
        return CallFeed(inputs, static, ref_tokens, _lasting(text, {"rope_cos", "rope_sin"}))

    def kv(self, target, target_ids, refs, ref_ids, text, text_ids, timestep) -> CallFeed:
        """The KV graph: new references (extract; 0 tokens on cached steps and without references) on their own
        RoPE tables; text and target on theirs."""
        inputs = self._common(target, text, timestep)
        inputs["rope_cos"], inputs["rope_sin"] = self._rope("rope_text_target", text_ids, target_ids)
        ref_tokens = _count(ref_ids, refs)
        if ref_tokens:
            inputs["refs"] = self._static("refs", refs)
            inputs["ref_rope_cos"], inputs["ref_rope_sin"] = self._rope("rope_refs", ref_ids)
        else:
            inputs["refs"] = Empty((1, 0, self.dims.in_channels), self.dtype)
            inputs["ref_rope_cos"] = inputs["ref_rope_sin"] = Empty((0, self.dims.head_dim), np.dtype(np.float32))
        static = frozenset({"text", "refs", "rope_cos", "rope_sin", "ref_rope_cos", "ref_rope_sin"})
        tables = {"rope_cos", "rope_sin"} | ({"ref_rope_cos", "ref_rope_sin"} if ref_tokens else set())
        return CallFeed(inputs, static, ref_tokens, _lasting(text, tables))

    # -- helpers ---------------------------------------------------------------------------------------------

    def _common(self, target, text, timestep) -> dict[str, np.ndarray | Empty]:
        # (1, N_t, C), new every step; a backend's device-resident latents (``on_device``) are bound as they are
        target = target if getattr(target, "on_device", False) else self._cast(target)
        return {"target": target,
                "text": self._static("text", text),  # (1, L, D)
                "timestep": np.array([timestep], np.float32)}  # (1,)

    def _cast(self, array: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(array), dtype=self.dtype)

    def _static(self, name: str, source: Any) -> np.ndarray:
        if _read_only(source):  # the same prompt in a later generation: the same cast
            return self.lasting.get(("cast", name, id(source)), source, lambda: self._cast(source))
        return self.memo.get(name, (source,), lambda: self._cast(source))

    def _rope(self, name: str, *ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cos, sin) float32 tables (N, head_dim) for the concatenated position ids, kept across generations."""
        def tables() -> tuple[np.ndarray, np.ndarray]:
            joined = np.ascontiguousarray(np.concatenate(ids, axis=0), dtype=np.int64)  # (N, 4)
            key = ("rope", name, joined.shape, hashlib.blake2b(joined.tobytes(), digest_size=16).digest())
            return self.lasting.get(key, None, lambda: rope_cos_sin(joined, self.dims.axes_dims_rope,
                                                                     self.dims.rope_theta))

        return self.memo.get(name, ids, tables)


def _lasting(text: Any, tables: set[str]) -> frozenset[str]:
    return frozenset(tables | ({"text"} if _read_only(text) else set()))


def _read_only(array: Any) -> bool:
    return isinstance(array, np.ndarray) and not array.flags.writeable


def _nbytes(value: Any) -> int:
    return sum(_nbytes(v) for v in value) if isinstance(value, tuple) else int(getattr(value, "nbytes", 0))


def _count(ref_ids: np.ndarray | None, refs: Any) -> int:
    return 0 if refs is None or ref_ids is None else int(ref_ids.shape[0])
