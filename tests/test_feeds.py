"""engines.feeds: what outlives a generation (RoPE tables by content, read-only prompts by identity) and what
never does (a writeable prompt, changed in place between generations, is read again)."""

from __future__ import annotations

import numpy as np
import pytest

from sparse_context.engines.feeds import FeedBuilder, LastingArrays
from sparse_context.export.rope import rope_cos_sin
from sparse_context.export.spec import ModelDims
from sparse_context.reference.benchmark_configs import CONFIGS
from sparse_context.runtime.tokens import grid_position_ids, text_position_ids

DIMS = ModelDims.from_config(CONFIGS["tiny"])


def _call(builder, text, rows=3, cols=4, ref_ids=None, refs=None):
    target = np.zeros((1, rows * cols, DIMS.in_channels), np.float32)
    return builder.kv(target, grid_position_ids(rows, cols), refs, ref_ids, text, text_position_ids(text.shape[1]),
                      np.float32(0.5))


def test_rope_tables_outlive_the_generation_keyed_by_the_ids_contents():
    builder = FeedBuilder(DIMS, np.float16)
    text = np.ones((1, 8, DIMS.text_dim), np.float32)
    first = _call(builder, text)
    builder.clear()  # the next image: new id arrays with the same contents
    second = _call(builder, text)
    assert second.inputs["rope_cos"] is first.inputs["rope_cos"] and {"rope_cos", "rope_sin"} <= second.lasting
    expected = rope_cos_sin(np.concatenate([text_position_ids(8), grid_position_ids(3, 4)]), DIMS.axes_dims_rope,
                            DIMS.rope_theta)
    np.testing.assert_array_equal(second.inputs["rope_cos"], expected[0])
    builder.clear()
    other = _call(builder, text, rows=4, cols=3)  # same token count, other positions: other tables
    assert other.inputs["rope_cos"] is not first.inputs["rope_cos"]
    assert not np.array_equal(other.inputs["rope_cos"], first.inputs["rope_cos"])
    refs = np.zeros((1, 5, DIMS.in_channels), np.float32)
    with_refs = _call(builder, text, ref_ids=grid_position_ids(5, 1, time=10), refs=refs)
    assert {"ref_rope_cos", "ref_rope_sin"} <= with_refs.lasting and "refs" not in with_refs.lasting


def test_only_a_read_only_prompt_outlives_the_generation():
    builder = FeedBuilder(DIMS, np.float16)
    writeable = np.full((1, 8, DIMS.text_dim), 0.5, np.float32)
    first = _call(builder, writeable)
    assert "text" not in first.lasting
    builder.clear()
    writeable[...] = 2.0  # changed in place between images: must be read again
    assert float(_call(builder, writeable).inputs["text"][0, 0, 0]) == 2.0

    frozen = writeable.copy()
    frozen.flags.writeable = False
    kept = _call(builder, frozen)
    builder.clear()
    again = _call(builder, frozen)
    assert "text" in again.lasting and again.inputs["text"] is kept.inputs["text"]
    assert again.inputs["text"].dtype == np.float16


def test_lasting_arrays_drop_the_least_recent_past_the_byte_cap():
    cache = LastingArrays(max_bytes=250)
    made = []

    def make(n):
        made.append(n)
        return np.zeros(n, np.uint8)

    a = cache.get("a", None, lambda: make(100))
    cache.get("b", None, lambda: make(100))
    assert cache.get("a", None, lambda: make(1)) is a  # a hit moves "a" to the recent end
    cache.get("c", None, lambda: make(100))  # 300 > 250 bytes: "b" goes
    assert cache.nbytes == 200 and cache.hits == 1 and cache.misses == 3
    cache.get("b", None, lambda: make(100))
    assert made == [100, 100, 100, 100]
    big = cache.get("big", None, lambda: make(1000))  # larger than the cap alone: kept until the next entry
    assert cache.get("big", None, lambda: make(1)) is big and cache.nbytes == 1000
    cache.clear()
    assert cache.nbytes == 0


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_a_read_only_prompt_of_the_engine_dtype_is_used_as_it_is(dtype):
    builder = FeedBuilder(DIMS, dtype)
    text = np.ones((1, 8, DIMS.text_dim), dtype)
    text.flags.writeable = False
    assert _call(builder, text).inputs["text"] is text
