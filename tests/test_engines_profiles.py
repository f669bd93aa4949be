"""Profiles from buckets + an input-shape description; trtexec shape strings and their parse errors."""

from __future__ import annotations

import pytest

from sparse_context.engines.buckets import BucketPlan, Resolution
from sparse_context.engines.errors import ProfileError
from sparse_context.engines.profiles import (
    Profile, dim_range, engine_profiles, format_shapes, parse_shapes, parse_trtexec_profile, profile_index,
    profile_shapes, trtexec_shape_args,
)
from sparse_context.runtime.errors import InputError

# Input names of export/graphs.py's KVGraph.forward; dims as an export spec would declare them.
KV_INPUTS = {
    "target": (1, "target_tokens", 128),
    "refs": (1, "ref_tokens", 128),
    "text": (1, "text_tokens", 64),
    "timestep": (1,),
    "rope_cos": ("text_tokens + target_tokens", 128),
    "ref_rope_cos": ("ref_tokens", 128),
    "cached_keys": (3, 1, "cached_tokens", 2, 16),
}
FULL_INPUTS = {
    "target": (1, "target_tokens", 128),
    "refs": (1, "ref_tokens", 128),
    "rope_cos": ("text_tokens + target_tokens + ref_tokens", 128),
}


def test_kv_engine_has_extract_and_cached_profile_per_bucket():
    plan = BucketPlan(keep_fractions=(0.10, 1.0), max_refs=2, target_resolutions=(Resolution(512, 512),))
    profiles = engine_profiles(plan, "kv", KV_INPUTS)
    assert [p.name for p in profiles] == ["keep0.10/extract", "keep0.10/cached", "keep1.00/extract",
                                          "keep1.00/cached"]
    extract = profiles[0].shape_dict()
    assert extract["refs"] == ((1, 0, 128), (1, 820, 128), (1, 820, 128))  # 2 x kept(4096, 0.1) = 820
    assert extract["cached_keys"] == ((3, 1, 0, 2, 16),) * 3
    assert extract["rope_cos"] == ((512 + 1024, 128),) * 3
    assert extract["timestep"] == ((1,),) * 3
    cached = profiles[3].shape_dict()
    assert cached["refs"] == ((1, 0, 128),) * 3
    assert cached["cached_keys"] == ((3, 1, 821, 2, 16), (3, 1, 8192, 2, 16), (3, 1, 8192, 2, 16))
    assert profile_index(profiles, "keep1.00", "cached") == 3


def test_full_engine_rope_rows_sum_every_stream():
    plan = BucketPlan(keep_fractions=(0.25,), max_refs=1)
    (profile,) = engine_profiles(plan, "full", FULL_INPUTS)
    assert profile.name == "keep0.25/full"
    assert profile.shape_dict()["rope_cos"] == ((512 + 4096, 128), (512 + 4096 + 1024, 128),
                                                (512 + 4096 + 1024, 128))


def test_symbol_names_map_onto_export_names():
    inputs = {"refs": (1, "n_ref", 128)}
    (profile,) = engine_profiles(BucketPlan(keep_fractions=(1.0,), max_refs=1), "full", inputs,
                                 symbol_names={"ref_tokens": "n_ref"})
    assert profile.shape_dict()["refs"][2] == (1, 4096, 128)


def test_unknown_symbol_names_input_and_known_symbols():
    match = r"symbol in dim 'n_ref' of input 'refs': got 'n_ref'; allowed: .*ref_tokens"
    with pytest.raises(ProfileError, match=match):
        engine_profiles(BucketPlan(), "full", {"refs": (1, "n_ref", 128)})


@pytest.mark.parametrize("dim", [-1, True, "", 1.5, None])
def test_bad_dims(dim):
    with pytest.raises(ProfileError, match="dim of input 'x'"):
        dim_range(dim, {}, "x")


def test_bad_symbol_range():
    with pytest.raises(ProfileError, match=r"range of symbol 'n': got \(5, 2, 9\); allowed: 0 <= min <= opt <= max"):
        profile_shapes({"x": ("n",)}, {"n": (5, 2, 9)})


def test_dim_sum_with_constant():
    assert dim_range("a + 2 + b", {"a": (0, 1, 2), "b": (3, 3, 3)}, "x") == (5, 6, 7)


def test_profile_json_round_trip():
    (profile,) = engine_profiles(BucketPlan(keep_fractions=(0.05,)), "full", FULL_INPUTS)
    assert Profile.from_json(profile.to_json()) == profile


def test_profile_index_unknown():
    profiles = engine_profiles(BucketPlan(keep_fractions=(0.05,)), "full", FULL_INPUTS)
    with pytest.raises(ProfileError, match="engine profile: got 'keep0.05/cached'; allowed: keep0.05/full"):
        profile_index(profiles, "keep0.05", "cached")


def test_trtexec_round_trip():
    plan = BucketPlan(keep_fractions=(0.10,), max_refs=6)
    (profile, _) = engine_profiles(plan, "kv", KV_INPUTS)
    args = trtexec_shape_args(profile)
    assert args[0].startswith("--minShapes=cached_keys:3x1x0x2x16,ref_rope_cos:0x128,refs:1x0x128,")
    assert "--maxShapes=" in args[2] and "refs:1x2460x128" in args[2]
    texts = [arg.split("=", 1)[1] for arg in args]
    assert parse_trtexec_profile(*texts) == profile.shape_dict()


def test_format_and_parse_special_names():
    shapes = {"input:0": (1, 410, 128), "scalar": ()}
    text = format_shapes(shapes)
    assert text == "input:0:1x410x128,scalar:"
    assert parse_shapes(text) == shapes
    assert parse_shapes("'my input':2x3") == {"my input": (2, 3)}


@pytest.mark.parametrize("text, match", [
    ("", r"shape list: got ''; allowed: name:DxDxD"),
    ("refs", r"shape entry: got 'refs'; allowed: name:DxDxD, e.g. refs:1x410x128"),
    (":1x2", r"shape entry: got ':1x2'"),
    ("refs:1xax3", r"shape of 'refs': got '1xax3'; allowed: dims as integers joined by 'x'"),
    ("refs:1x-2", r"shape of 'refs': got '1x-2'; allowed: dims >= 0"),
    ("refs:1x2,refs:1x3", r"each input once; 'refs' repeats"),
])
def test_parse_errors(text, match):
    with pytest.raises(ProfileError, match=match) as error:
        parse_shapes(text, flag="--optShapes")
    assert isinstance(error.value, InputError)
    if text:
        assert "--optShapes" in str(error.value)


def test_trtexec_profile_errors():
    with pytest.raises(ProfileError, match="must name the same inputs"):
        parse_trtexec_profile("a:1", "a:1,b:2", "a:1")
    with pytest.raises(ProfileError, match="different ranks"):
        parse_trtexec_profile("a:1", "a:1x1", "a:1")
    with pytest.raises(ProfileError, match="need min <= opt <= max in every dim; got \\(4,\\), \\(2,\\), \\(8,\\)"):
        parse_trtexec_profile("a:4", "a:2", "a:8")


def test_profile_selector_maps_each_request_to_one_profile():
    from sparse_context.engines.buckets import BucketPlan, Resolution
    from sparse_context.engines.errors import ProfileError
    from sparse_context.engines.profiles import ProfileSelector, engine_profiles

    plan = BucketPlan(keep_fractions=(0.05, 0.1, 1.0), max_refs=2, ref_resolution=Resolution(512, 512),
                      target_resolutions=(Resolution(512, 512),), text_tokens=32)
    assert BucketPlan.from_json(plan.to_json()) == plan
    shapes = {"refs": (1, "ref_tokens", 8), "cached_keys": (2, 1, "cached_tokens", 1, 4),
              "target": (1, "target_tokens", 8), "text": (1, "text_tokens", 4)}
    profiles = {"kv": engine_profiles(plan, "kv", shapes)}
    selector = ProfileSelector(plan, profiles, strict_shapes=True)
    for tokens in range(0, plan.max_ref_tokens + 1, 7):  # every count lands in exactly one bucket
        for step in ("extract", "cached"):
            choice = selector.choose("kv", step, tokens, 1024, 32)
            profile = profiles["kv"][choice.index]
            assert (profile.bucket, profile.step) == (choice.bucket.name, step) and choice.bucket.covers(tokens)
            assert sum(b.covers(tokens) for b in plan.buckets) == 1
    with pytest.raises(ProfileError, match="exceed every engine profile.*rebuild with --max-refs 3"):
        selector.choose("kv", "extract", plan.max_ref_tokens + 1, 1024, 32)
    with pytest.raises(ProfileError, match="step of the kv graph: got 'full'"):
        selector.choose("kv", "full", 10, 1024, 32)
    with pytest.raises(ProfileError, match="rebuild with --target-resolutions 512x512 1024x1024"):
        selector.choose("kv", "extract", 10, 4096, 32)
    with pytest.raises(ProfileError, match="padded to 32 tokens.*--text-tokens 512"):
        selector.choose("kv", "extract", 10, 1024, 512)
    with pytest.raises(ProfileError, match="output of 256 target tokens is outside the engines' range 1024..1024"):
        selector.choose("kv", "extract", 10, 256, 32)
    # onnxruntime CUDA/CPU: any text length and any output up to the largest built one; buckets still enforced
    loose = ProfileSelector(plan)
    assert loose.choose("kv", "cached", 10, 1024, 512).index is None
    assert loose.choose("kv", "cached", 10, 256, 512).index is None  # 256x256 on 512x512 engines: smaller runs
    with pytest.raises(ProfileError, match=r"output of 1024x1024 px \(4096 target tokens\) is more than the engines' "
                                           r"largest built output \(1024 tokens\) \(built for 512x512 \(1024 tokens\)\); "
                                           r"rebuild with --target-resolutions 512x512 1024x1024"):
        loose.check_target(4096, (1024, 1024))
    with pytest.raises(ProfileError, match="more than the engines' largest built output"):
        loose.choose("kv", "cached", 10, 4096, 512)
    with pytest.raises(ProfileError, match="recorded bucket plan"):
        BucketPlan.from_json({"max_refs": 2})
