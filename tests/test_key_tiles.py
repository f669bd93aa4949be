"""Kept tokens rounded up to whole attention-key tiles (``--key-tile``).

A step's attention runs over the text, target and kept reference tokens; a kernel tiles the keys (128 per tile at
head size 128), so a last partial tile costs about a whole one. ``key_tile`` keeps more reference tokens, never
fewer, until text + target + kept is a multiple of the tile. These tests pin the counts (exact), that every path
(selection, the engine runtime, the engine pipeline, the PyTorch generator) rounds the same way, that the parity of
the two generation paths holds with it (latents within 1e-4, as ``test_engine_pipeline``), and its errors.
"""

from __future__ import annotations

import numpy as np
import pytest

from sparse_context.runtime.errors import InputError, SelectionError
from sparse_context.runtime.selection import allocate_budget, select_references
from sparse_context.runtime.tokens import check_key_tile, whole_tile_tokens

TEXT, TARGET = 512, 4096  # klein's padded prompt and a 1024^2 target: 4608 keys, 36 whole tiles of 128


def test_whole_tile_tokens_rounds_up_to_the_next_tile_and_never_down():
    # klein-9b's cached call at keep 0.10: 6 x 410 = 2460 kept, 7068 keys, 55 tiles and 28 keys of a 56th.
    assert whole_tile_tokens(2460, TEXT + TARGET, 128, 6 * 4096) == 2560
    assert (2560 + TEXT + TARGET) % 128 == 0
    assert whole_tile_tokens(2560, TEXT + TARGET, 128, 6 * 4096) == 2560  # already whole: unchanged
    assert whole_tile_tokens(2561, TEXT + TARGET, 128, 6 * 4096) == 2688
    assert whole_tile_tokens(13, 100, 16, 1000) == 28  # 113 -> 128 keys
    assert whole_tile_tokens(13, 100, 16, 20) == 20  # at most every token there is
    assert whole_tile_tokens(13, 100, None, 1000) == whole_tile_tokens(13, 100, 0, 1000) == 13  # off
    assert whole_tile_tokens(0, 100, 16, 1000) == 0  # no references: nothing to top up
    assert whole_tile_tokens(7, 0, 1, 1000) == 7  # a tile of one key is every count


@pytest.mark.parametrize("bad", [-1, 1025, 2.5, True, "128"])
def test_a_key_tile_out_of_range_names_the_flag(bad):
    with pytest.raises(InputError, match=r"key tile: got .*allowed: an integer from 1 to 1024.*--key-tile"):
        check_key_tile(bad)
    assert check_key_tile(None) is None and check_key_tile(0) is None and check_key_tile(np.int64(0)) is None
    assert check_key_tile(np.int64(64)) == 64 and check_key_tile(1) == 1


@pytest.mark.parametrize("allocation", ["per_reference", "global"])
def test_budgets_fill_whole_tiles_with_one_extra_token_per_reference_in_turn(allocation):
    importances = [np.ones((64, 64), np.float32)] * 6
    plain = allocate_budget(importances, 0.1, allocation=allocation)
    tiled = allocate_budget(importances, 0.1, allocation=allocation, key_tile=128, other_keys=TEXT + TARGET)
    # Per reference 6 x 410 = 2460; one pool rounds to 2458 (410 x 4 + 409 x 2). Both top up to 2560.
    assert sum(plain) == (2460 if allocation == "per_reference" else 2458) and sum(tiled) == 2560
    extra = np.array(tiled) - np.array(plain)
    assert extra.min() >= 0 and extra.max() - extra.min() <= 1 and tiled == [427, 427, 427, 427, 426, 426]
    # References with no tokens left get none: a 4-token reference is kept whole, the other takes the rest.
    small = [np.ones((2, 2), np.float32), np.ones((8, 8), np.float32)]
    counts = allocate_budget(small, token_count=3, key_tile=32, other_keys=20)
    assert counts == [4, 8] and (sum(counts) + 20) % 32 == 0  # 6 kept + 20 keys -> 32: 6 more, 1 fits the first
    assert allocate_budget(small, token_count=3, key_tile=128, other_keys=0) == [4, 64]  # capped: every token


def test_top_up_takes_what_each_strategy_would_take_next():
    from sparse_context.runtime.selection import top_up_tokens

    importance = np.zeros((8, 8), np.float32)
    importance.flat[[5, 9, 40]] = [3.0, 2.0, 1.0]
    kept = np.array([9])
    # Scored strategies: the most important tokens not kept, in importance order.
    assert top_up_tokens(importance, kept, 2, "edge", 0).tolist() == [5, 40]
    # uniform: farthest from everything kept, one at a time: the far corner of an 8x8 grid from token 9 (1, 1),
    # then the corner farthest from both.
    assert top_up_tokens(importance, kept, 2, "uniform", 0).tolist() == [7, 63]
    assert top_up_tokens(importance, np.zeros(0, np.int64), 1, "uniform", 0).tolist() == [0]
    picks = top_up_tokens(importance, kept, 5, "random", 4)
    assert picks.size == 5 and 9 not in picks and picks.tolist() == top_up_tokens(importance, kept, 5, "random",
                                                                                    4).tolist()
    assert top_up_tokens(importance, kept, 0, "edge", 0).size == 0
    with pytest.raises(SelectionError, match=r"extra tokens: got 64; allowed: an integer from 0 to 63"):
        top_up_tokens(importance, kept, 64, "edge", 0)


def test_a_negative_key_count_is_refused():
    with pytest.raises(SelectionError, match="other attention keys: got -1"):
        allocate_budget([np.ones((4, 4))], 0.5, key_tile=16, other_keys=-1)


@pytest.mark.parametrize("allocation", ["per_reference", "global"])
@pytest.mark.parametrize("strategy", ["uniform", "random", "edge", "saliency"])
def test_select_references_tops_up_the_plain_selection_with_distinct_tokens(reference_photos, strategy, allocation):
    """The top-up adds tokens to the selection as kept and removes none, so 'more tokens than asked' means the
    asked-for ones and a few more."""
    plain = select_references(reference_photos, strategy=strategy, keep_fraction=0.1, allocation=allocation, seed=3)
    tiled = select_references(reference_photos, strategy=strategy, keep_fraction=0.1, allocation=allocation, seed=3,
                              key_tile=16, other_keys=100)
    kept, asked = sum(s.indices.size for s in tiled), sum(s.indices.size for s in plain)
    assert (kept + 100) % 16 == 0 and asked < kept < asked + 16
    for base, selection in zip(plain, tiled, strict=True):
        assert np.unique(selection.indices).size == selection.indices.size
        assert np.all(np.diff(selection.indices) > 0)
        assert np.isin(base.indices, selection.indices).all()  # a superset of the plain selection
    with pytest.raises(InputError, match="--key-tile"):
        select_references(reference_photos, strategy=strategy, keep_fraction=0.1, key_tile=-8)


# -- the generation paths -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pipeline(engines_dir):
    from sparse_context.engines.pipeline import EnginePipeline

    return EnginePipeline.from_engines(engines_dir)


def test_engine_pipeline_and_pytorch_generator_round_alike_and_agree(pipeline, tiny_generator, reference_photos):
    import torch

    latents = np.random.default_rng(7).standard_normal((1, 36, 128)).astype(np.float32)  # 96x96 px: 6x6 tokens
    kwargs = dict(num_steps=3, seed=2, height=96, width=96, keep_fraction=0.1, strategy="edge", use_kv=True)
    text = pipeline.encode_prompt("a red bicycle").shape[1]
    plain = pipeline.generate("a red bicycle", reference_photos, latents=latents, **kwargs)
    ours = pipeline.generate("a red bicycle", reference_photos, latents=latents, key_tile=16, **kwargs)
    theirs = tiny_generator.generate("a red bicycle", reference_photos, latents=torch.from_numpy(latents),
                                     key_tile=16, **kwargs)
    assert (ours.ref_tokens + text + 36) % 16 == 0 and plain.ref_tokens < ours.ref_tokens < plain.ref_tokens + 16
    assert theirs.ref_tokens == ours.ref_tokens
    for mine, reference in zip(ours.selections, theirs.selections, strict=True):
        np.testing.assert_array_equal(mine, reference)
    np.testing.assert_allclose(ours.latents, theirs.latents.numpy(), atol=1e-4, rtol=0)
    # A request without tiles after one with them is not handed the remembered tiled selection, and vice versa.
    again = pipeline.generate("a red bicycle", reference_photos, latents=latents, **kwargs)
    assert again.ref_tokens == plain.ref_tokens


def test_engine_runtime_rounds_the_kept_tokens_of_given_latents(pipeline):
    runtime = pipeline.runtime
    rng = np.random.default_rng(3)
    embeds = rng.standard_normal((1, 64, runtime.backend.dims.text_dim)).astype(np.float32)
    grids = [rng.standard_normal((runtime.backend.dims.in_channels, 16, 16)).astype(np.float32) for _ in range(3)]
    kwargs = dict(keep_fraction=0.1, strategy="uniform", use_kv=True, height=256, width=256, num_steps=2)
    plain = runtime.generate_latents(embeds, grids, **kwargs)
    tiled = runtime.generate_latents(embeds, grids, key_tile=128, **kwargs)
    assert plain.ref_tokens == 3 * 26 and tiled.ref_tokens == 192  # 64 text + 256 target + 192 = 512 keys, 4 tiles
    assert (tiled.ref_tokens + 64 + 256) % 128 == 0 and np.isfinite(tiled.latents).all()
    with pytest.raises(InputError, match="key tile: got 0.5"):
        runtime.generate_latents(embeds, grids, key_tile=0.5, **kwargs)


def test_generate_refuses_a_bad_key_tile_before_loading_anything(capsys):
    from sparse_context.cli import main

    code = main(["generate", "--prompt", "x", "--key-tile", "4096", "--out", "/tmp/sparse-context-never.png"])
    err = capsys.readouterr().err
    assert code == 2 and "key tile: got 4096" in err and "--key-tile" in err and "Traceback" not in err


def test_engines_built_with_a_key_tile_top_up_by_default(pipeline, engines_dir, reference_photos):
    """``build_engines.py --key-tile N`` records the tile in the plan; a generation on those engines tops up unless
    it asks otherwise (``key_tile=0``: as kept; another tile: that one). Engines without one keep what is asked."""
    import dataclasses

    from sparse_context.engines.runtime import EngineRuntime

    plain = pipeline.runtime
    index = dataclasses.replace(plain.index, plan=dataclasses.replace(plain.index.plan, key_tile=128))
    tiled = EngineRuntime(plain.backend, plain.scheduler_config, None, index)
    assert plain.key_tile_for(None) is None and tiled.key_tile_for(None) == 128
    assert tiled.key_tile_for(0) is None and tiled.key_tile_for(16) == 16 and EngineRuntime(plain.backend).key_tile_for(
        None) is None
    rng = np.random.default_rng(5)
    embeds = rng.standard_normal((1, 64, plain.backend.dims.text_dim)).astype(np.float32)
    grids = [rng.standard_normal((plain.backend.dims.in_channels, 16, 16)).astype(np.float32) for _ in range(3)]
    kwargs = dict(keep_fraction=0.1, strategy="uniform", height=256, width=256, num_steps=1)
    assert tiled.generate_latents(embeds, grids, **kwargs).ref_tokens == 192  # 64 + 256 + 192 = 4 tiles of 128
    assert tiled.generate_latents(embeds, grids, key_tile=0, **kwargs).ref_tokens == 78
    assert plain.generate_latents(embeds, grids, **kwargs).ref_tokens == 78
    # The PyTorch generator on the same engines (diffusers' text encoder and VAE) follows them alike.
    from sparse_context.reference.generator import SparseContextGenerator

    generator = SparseContextGenerator.from_engines(engines_dir)
    request = dict(keep_fraction=0.1, strategy="edge", height=96, width=96, num_steps=1, output_type="latent")
    untiled = generator.generate("a red bicycle", reference_photos, **request).ref_tokens
    generator.engines_index = index
    topped = generator.generate("a red bicycle", reference_photos, **request).ref_tokens
    assert (topped + 64 + 36) % 128 == 0 and untiled < topped < untiled + 128
    assert generator.generate("a red bicycle", reference_photos, key_tile=0, **request).ref_tokens == untiled


def test_build_engines_and_bench_gpu_refuse_a_bad_key_tile_before_any_work(tmp_path, capsys):
    from sparse_context.build_engines import main as build_main
    from sparse_context.cli import main

    assert build_main(["--demo", "--key-tile", "-1", "--out", str(tmp_path / "engines")]) == 2
    err = capsys.readouterr().err
    assert "key tile: got -1" in err and "--key-tile" in err and not (tmp_path / "engines").exists()
    assert main(["bench", "gpu", "--dry-run", "--key-tile", "5000"]) == 2
    assert "key tile: got 5000" in capsys.readouterr().err
