"""Bucket registry: coverage without gaps, counts from runtime.tokens, error texts, CLI options."""

from __future__ import annotations

import argparse

import pytest

from sparse_context.engines.buckets import (
    CACHED_TOKENS, DEFAULT_KEEP_FRACTIONS, KEEP_CHOICES, REF_TOKENS, TARGET_TOKENS, TEXT_TOKENS,
    BucketPlan, Resolution, add_bucket_arguments, plan_from_args, steps_for_graph, tokens_at,
)
from sparse_context.engines.errors import ProfileError
from sparse_context.runtime.errors import InputError
from sparse_context.runtime.tokens import MAX_REFERENCES, kept_token_count, token_grid


def test_default_buckets_use_kept_token_count():
    plan = BucketPlan()
    rows, cols = token_grid(1024, 1024)
    per_ref = rows * cols
    assert plan.tokens_per_ref == per_ref == 4096
    assert [b.keep_fraction for b in plan.buckets] == sorted(DEFAULT_KEEP_FRACTIONS)
    for bucket in plan.buckets:
        expected = max(6 * kept_token_count(per_ref, bucket.keep_fraction),
                       kept_token_count(6 * per_ref, bucket.keep_fraction))
        assert bucket.max_ref_tokens == expected
    assert [b.max_ref_tokens for b in plan.buckets] == [1230, 2460, 6144, 24576]
    assert [b.name for b in plan.buckets] == ["keep0.05", "keep0.10", "keep0.25", "keep1.00"]


@pytest.mark.parametrize("plan", [
    BucketPlan(),
    BucketPlan(keep_fractions=(0.5, 0.05), max_refs=3, typical_refs=1),
    BucketPlan(keep_fractions=(1.0,), max_refs=1, ref_resolution=Resolution(512, 512)),
    BucketPlan(keep_fractions=KEEP_CHOICES, max_refs=MAX_REFERENCES, ref_resolution=Resolution(768, 1344)),
    BucketPlan(keep_fractions=(0.05, 0.1, 1.0), max_refs=3, ref_resolution=Resolution(256, 256), key_tile=128),
])
def test_every_count_maps_to_exactly_one_bucket(plan):
    buckets = plan.buckets
    assert buckets[0].min_ref_tokens == 0
    for before, after in zip(buckets, buckets[1:]):
        assert after.min_ref_tokens == before.max_ref_tokens + 1  # no gap, no overlap
    for count in range(plan.max_ref_tokens + 1):
        covering = [b for b in buckets if b.covers(count)]
        assert len(covering) == 1
        assert plan.bucket_for(count) is covering[0]
    for bucket in buckets:
        assert bucket.min_ref_tokens <= bucket.opt_ref_tokens <= bucket.max_ref_tokens


def test_global_pool_rounding_is_covered():
    # 6 x kept(4096, 0.10) = 2460 but a global pool keeps kept(24576, 0.10) = 2458: both must fit the bucket.
    assert tokens_at(0.10, 6, 4096) == 2460
    assert tokens_at(0.05, 6, 4096) == max(6 * 205, kept_token_count(24576, 0.05))


def test_keeps_with_equal_maxima_collapse_to_smallest():
    # A one-token reference keeps one token at any fraction: one bucket, named after the smallest fraction.
    plan = BucketPlan(keep_fractions=(0.05, 0.25, 1.0), max_refs=2, ref_resolution=Resolution(16, 16))
    assert [(b.name, b.min_ref_tokens, b.max_ref_tokens) for b in plan.buckets] == [("keep0.05", 0, 2)]


def test_typical_refs_sets_opt():
    plan = BucketPlan(typical_refs=3)
    assert plan.bucket_named("keep0.25").opt_ref_tokens == 3 * 1024
    # 3 refs at keep 0.05 (615) lies inside the first bucket; at 1.0 (12288) inside the last.
    assert plan.bucket_named("keep0.05").opt_ref_tokens == 615
    assert plan.bucket_named("keep1.00").opt_ref_tokens == 12288


def test_opt_is_clipped_into_the_bucket():
    plan = BucketPlan(typical_refs=1)  # 1 ref at keep 0.25 = 1024 tokens, below the bucket's min 2461
    assert plan.bucket_named("keep0.25").opt_ref_tokens == 2461


def test_out_of_range_suggests_more_references():
    plan = BucketPlan()
    with pytest.raises(ProfileError) as error:
        plan.bucket_for(30000, request="8 refs at keep 0.9")
    message = str(error.value)
    assert "30000 reference tokens (8 refs at keep 0.9)" in message
    assert "nearest profile keep1.00 holds 6145..24576" in message
    assert "rebuild with --max-refs 8" in message
    assert isinstance(error.value, InputError)


def test_out_of_range_suggests_larger_keep():
    plan = BucketPlan(keep_fractions=(0.05, 0.10))
    with pytest.raises(ProfileError, match=r"nearest profile keep0.10 .* rebuild with --keeps 0.05 0.1 0.25$"):
        plan.bucket_for(3000)
    with pytest.raises(ProfileError, match=r"--keeps 0.05 0.1 0.5$"):
        plan.bucket_for(10000)


def test_out_of_range_beyond_any_build():
    with pytest.raises(ProfileError, match="no build covers it: 10 references .* hold at most 40960"):
        BucketPlan().bucket_for(40961)


@pytest.mark.parametrize("bad", [-1, 1.5, "12", True, None])
def test_bucket_for_rejects_non_counts(bad):
    with pytest.raises(ProfileError, match="reference tokens: got"):
        BucketPlan().bucket_for(bad)


def test_bucket_named_unknown():
    with pytest.raises(ProfileError, match="bucket: got 'keep0.33'; allowed: keep0.05, keep0.10"):
        BucketPlan().bucket_named("keep0.33")


@pytest.mark.parametrize("kwargs, match", [
    ({"keep_fractions": ()}, "keep fractions: got \\(\\); allowed: at least one"),
    ({"keep_fractions": (0.0,)}, "keep fraction: got 0.0.*--keeps"),
    ({"keep_fractions": (1.5,)}, "keep fraction: got 1.5"),
    ({"max_refs": 0}, "maximum references: got 0.*--max-refs"),
    ({"max_refs": MAX_REFERENCES + 1}, "number of reference images: got 11"),
    ({"typical_refs": 7}, "typical references: got 7; allowed: 1..6.*--typical-refs"),
    ({"target_resolutions": ()}, "target resolutions"),
    ({"target_resolutions": (Resolution(8, 8),)}, "image size: got '8x8 px'"),
    ({"text_tokens": 0}, "text tokens: got 0.*--text-tokens"),
    ({"key_tile": 4096}, "key tile: got 4096.*--key-tile"),
])
def test_plan_validation_names_the_flag(kwargs, match):
    with pytest.raises(InputError, match=match):
        BucketPlan(**kwargs).validate()


def test_symbol_ranges_per_step():
    plan = BucketPlan(target_resolutions=(Resolution(1024, 1024), Resolution(512, 512), Resolution(1344, 768)))
    bucket = plan.bucket_named("keep0.10")
    low, opt, high = plan.target_token_range()
    assert (low, opt, high) == (32 * 32, 64 * 64, 64 * 64)  # 1344x768 has 84 x 48 = 4032 tokens
    extract = plan.symbol_ranges(bucket, "extract")
    assert extract[REF_TOKENS] == (1231, 2460, 2460) and extract[CACHED_TOKENS] == (0, 0, 0)
    cached = plan.symbol_ranges(bucket, "cached")
    assert cached[REF_TOKENS] == (0, 0, 0) and cached[CACHED_TOKENS] == (1231, 2460, 2460)
    assert plan.symbol_ranges(bucket, "full")[REF_TOKENS] == (1231, 2460, 2460)
    assert extract[TEXT_TOKENS] == (512, 512, 512) and extract[TARGET_TOKENS] == (low, opt, high)
    with pytest.raises(ProfileError, match="step: got 'denoise'; allowed: cached, extract, full"):
        plan.symbol_ranges(bucket, "denoise")


def test_steps_for_graph():
    assert steps_for_graph("kv") == ("extract", "cached")
    assert steps_for_graph("full") == ("full",)
    with pytest.raises(ProfileError, match="graph: got 'dense'; allowed: full or kv.*--graph"):
        steps_for_graph("dense")


def test_resolution_parse():
    assert Resolution.parse("768x1344") == Resolution(768, 1344)
    assert Resolution.parse("768x1344").tokens == 48 * 84
    for bad in ("1024", "axb", "1024x", "-16x16"):
        with pytest.raises(InputError, match="resolution: got .*WIDTHxHEIGHT"):
            Resolution.parse(bad)


def test_cli_options_round_trip_through_build_args():
    parser = argparse.ArgumentParser()
    add_bucket_arguments(parser)
    defaults = plan_from_args(parser.parse_args([]))
    assert defaults == BucketPlan()
    plan = BucketPlan(keep_fractions=(0.05, 0.5), max_refs=8, typical_refs=2, ref_resolution=Resolution(512, 512),
                      target_resolutions=(Resolution(1344, 768), Resolution(1024, 1024)), text_tokens=256)
    assert plan_from_args(parser.parse_args(list(plan.build_args()))) == plan
    assert "--key-tile" not in plan.build_args()  # rebuild hints of plans without a tile stay as they were
    tiled = BucketPlan(key_tile=128)
    assert plan_from_args(parser.parse_args(list(tiled.build_args()))) == tiled
    assert BucketPlan.from_json(tiled.to_json()) == tiled
    old = {k: v for k, v in BucketPlan().to_json().items() if k != "key_tile"}  # engines.json before --key-tile
    assert BucketPlan.from_json(old) == BucketPlan()


def test_a_key_tile_gives_each_bucket_room_for_the_top_up():
    """--key-tile 128: a generation keeps up to 127 tokens more than its keep fraction asks (whole tiles of keys for
    any target size), so each bucket's maximum holds them and its opt is the topped-up count at the first target
    size: klein at 1024^2, six references, keep 0.10 -> 2,460 kept, 2,560 topped up (7,168 keys), at most 2,587."""
    plan = BucketPlan(key_tile=128)
    assert [b.max_ref_tokens for b in plan.buckets] == [1230 + 127, 2460 + 127, 6144 + 127, 24576]
    assert [b.opt_ref_tokens for b in plan.buckets] == [1280, 2560, 6144, 24576]  # 512 + 4096 + opt: whole tiles
    assert plan.bucket_for(2560).name == "keep0.10" and BucketPlan().bucket_for(2560).name == "keep0.25"
    assert plan.topped_up(2460, 6, 4096) == 2560 and plan.topped_up(2460, 6) == 2587 and plan.topped_up(9, 1) == 136
    assert BucketPlan(max_refs=1, ref_resolution=Resolution(64, 64), key_tile=128).topped_up(9, 1) == 16  # capped
    assert BucketPlan().topped_up(2460, 6, 4096) == 2460  # no tile: as kept
    small = BucketPlan(keep_fractions=(0.05, 0.1), key_tile=128)
    assert small.bucket_for(2587).name == "keep0.10"
    with pytest.raises(ProfileError, match="2588 reference tokens exceed every engine profile; nearest profile "
                       "keep0.10 holds 1358..2587.*rebuild with --keeps 0.05 0.1 0.25"):
        small.bucket_for(2588)


def test_cli_choices_come_from_registry():
    parser = argparse.ArgumentParser()
    add_bucket_arguments(parser)
    choices = {action.dest: action.choices for action in parser._actions}
    assert tuple(choices["keeps"]) == KEEP_CHOICES
    assert choices["target_resolutions"] is None  # any size of whole tokens within the limits
    assert list(choices["max_refs"]) == list(range(1, MAX_REFERENCES + 1))
    with pytest.raises(SystemExit):
        parser.parse_args(["--keeps", "0.3"])


@pytest.mark.parametrize("text, ok", [("1280x720", True), ("2048x2048", True), ("64x4096", True),
                                      ("1000x1000", False), ("4112x64", False), ("2064x2048", False),
                                      ("0x512", False)])
def test_any_target_size_of_whole_tokens_within_the_limits(text, ok):
    from sparse_context.engines.buckets import FLAG_TARGET_RESOLUTIONS, plan_from_args

    parser = argparse.ArgumentParser()
    add_bucket_arguments(parser)
    args = parser.parse_args([FLAG_TARGET_RESOLUTIONS, text])
    if ok:
        assert plan_from_args(args).target_resolutions[0].name == text
    else:
        with pytest.raises(InputError, match=f"resolution: got '{text}'.*{FLAG_TARGET_RESOLUTIONS}"):
            plan_from_args(args)


def test_reference_resolution_within_the_area_references_are_resized_to():
    from sparse_context.engines.buckets import FLAG_REF_RESOLUTION, plan_from_args

    parser = argparse.ArgumentParser()
    add_bucket_arguments(parser)
    assert plan_from_args(parser.parse_args([FLAG_REF_RESOLUTION, "1280x768"])).ref_resolution.name == "1280x768"
    with pytest.raises(InputError, match="reference resolution: got '1280x1280'.*--ref-resolution"):
        plan_from_args(parser.parse_args([FLAG_REF_RESOLUTION, "1280x1280"]))
