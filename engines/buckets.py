"""The one registry of sparsity buckets: which reference-token counts each engine profile serves.

A bucket is a keep fraction applied to up to ``max_refs`` references of a declared resolution. Its maximum is
the most reference tokens that keep fraction can produce; its minimum is one past the previous bucket's
maximum, so the buckets tile ``0 .. largest maximum`` with no gap and a request always lands in the smallest
(fastest) profile that can hold it. Every count comes from ``runtime.tokens``; none is typed here.

The KV graph runs two kinds of steps inside one engine (one copy of the weights): ``extract`` (new references,
nothing cached) and ``cached`` (no new references, the bucket's tokens cached). Each gets its own profile.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import cached_property

from sparse_context.engines.errors import ProfileError
from sparse_context.runtime.errors import InputError, bad_value
from sparse_context.runtime.limits import MAX_OUTPUT_PIXELS, MAX_SIDE_PIXELS, check_output_size
from sparse_context.runtime.tokens import (
    KEY_TILE_FLAG, MAX_REFERENCE_AREA, MAX_REFERENCES, TOKEN_PIXELS, check_keep_fraction, check_key_tile,
    check_reference_count, kept_token_count, token_grid, whole_tile_tokens,
)

# Symbolic axis names of the graphs' token axes; export specs map their own names onto these if they differ.
REF_TOKENS = "ref_tokens"  # new reference tokens fed this call
CACHED_TOKENS = "cached_tokens"  # reference tokens whose K/V come from the cache
TARGET_TOKENS = "target_tokens"
TEXT_TOKENS = "text_tokens"

# Which steps (= profiles per bucket) each graph's engine holds.
STEPS_BY_GRAPH = {"full": ("full",), "kv": ("extract", "cached")}
GRAPH_CHOICES = tuple(STEPS_BY_GRAPH)

KEEP_CHOICES = (0.05, 0.10, 0.25, 0.5, 1.0)  # what --keeps accepts
DEFAULT_KEEP_FRACTIONS = (0.05, 0.10, 0.25, 1.0)  # the fractions measured in NOTES §1
DEFAULT_MAX_REFS = 6
DEFAULT_TEXT_TOKENS = 512  # Klein pads prompts to 512 tokens

FLAG_KEEPS = "--keeps"
FLAG_MAX_REFS = "--max-refs"
FLAG_TYPICAL_REFS = "--typical-refs"
FLAG_REF_RESOLUTION = "--ref-resolution"
FLAG_TARGET_RESOLUTIONS = "--target-resolutions"
FLAG_TEXT_TOKENS = "--text-tokens"
FLAG_KEY_TILE = KEY_TILE_FLAG


@dataclass(frozen=True)
class Resolution:
    """An image size in pixels; its token count comes from ``token_grid``."""

    width_px: int
    height_px: int

    @property
    def name(self) -> str:
        return f"{self.width_px}x{self.height_px}"

    @property
    def tokens(self) -> int:
        rows, cols = token_grid(self.width_px, self.height_px)
        return rows * cols

    @classmethod
    def parse(cls, text: str, flag: str = FLAG_TARGET_RESOLUTIONS) -> Resolution:
        """``"1024x1024"`` -> Resolution(1024, 1024); raises InputError naming ``flag`` otherwise."""
        parts = str(text).lower().split("x")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise InputError(bad_value("resolution", text, "WIDTHxHEIGHT in pixels, e.g. 1024x1024", flag))
        resolution = cls(int(parts[0]), int(parts[1]))
        try:
            check_output_size(resolution.width_px, resolution.height_px)
        except InputError:  # the same limits as a request, under this option's name
            raise InputError(bad_value("resolution", text, f"WIDTHxHEIGHT of whole {TOKEN_PIXELS}-px tokens, each "
                                       f"side {TOKEN_PIXELS} to {MAX_SIDE_PIXELS} px, at most "
                                       f"{MAX_OUTPUT_PIXELS // 2**20} megapixels", flag)) from None
        if flag == FLAG_REF_RESOLUTION and resolution.width_px * resolution.height_px > MAX_REFERENCE_AREA:
            raise InputError(bad_value("reference resolution", text, "at most 1024x1024 px of area: references "
                                       "are resized down to that before encoding", flag))
        return resolution


DEFAULT_RESOLUTION = Resolution(1024, 1024)
# Declared sizes (all <= 1024^2 px, multiples of 16); CLI choices come from here.
RESOLUTIONS = (DEFAULT_RESOLUTION, Resolution(1152, 896), Resolution(896, 1152), Resolution(1344, 768),
               Resolution(768, 1344), Resolution(512, 512))
RESOLUTION_CHOICES = tuple(resolution.name for resolution in RESOLUTIONS)


@dataclass(frozen=True)
class Bucket:
    """Reference-token range ``[min_ref_tokens, max_ref_tokens]`` served by one profile; opt tunes kernels."""

    keep_fraction: float
    min_ref_tokens: int
    opt_ref_tokens: int
    max_ref_tokens: int

    @property
    def name(self) -> str:
        return f"keep{self.keep_fraction:.2f}"

    def covers(self, ref_tokens: int) -> bool:
        return self.min_ref_tokens <= ref_tokens <= self.max_ref_tokens

    @property
    def token_range(self) -> tuple[int, int, int]:
        return self.min_ref_tokens, self.opt_ref_tokens, self.max_ref_tokens


def tokens_at(keep_fraction: float, num_refs: int, tokens_per_ref: int) -> int:
    """Most reference tokens ``num_refs`` references can keep at ``keep_fraction``, under either allocation.

    Per-reference rounding (``kept_token_count`` per image) and one global pool round differently
    (6 x 410 = 2460 vs 2458 at 0.10), so a profile must hold the larger of the two.
    """
    per_reference = num_refs * kept_token_count(tokens_per_ref, keep_fraction)
    pooled = kept_token_count(num_refs * tokens_per_ref, keep_fraction)
    return max(per_reference, pooled)


@dataclass(frozen=True)
class BucketPlan:
    """Everything that fixes an engine's profiles: keep fractions x references x resolutions x text length."""

    keep_fractions: tuple[float, ...] = DEFAULT_KEEP_FRACTIONS
    max_refs: int = DEFAULT_MAX_REFS
    typical_refs: int | None = None  # opt shapes are tuned for this many references (default: max_refs)
    ref_resolution: Resolution = DEFAULT_RESOLUTION
    target_resolutions: tuple[Resolution, ...] = (DEFAULT_RESOLUTION,)  # the first one is the opt shape
    text_tokens: int = DEFAULT_TEXT_TOKENS
    # Kept tokens are topped up to whole tiles of this many attention keys (--key-tile; 0: as kept): each bucket holds
    # up to key_tile - 1 tokens more, and the engines' generations top up by default.
    key_tile: int = 0

    def validate(self) -> BucketPlan:
        """Raise InputError (naming the flag) for any out-of-range option; return self. No side effects."""
        if not self.keep_fractions:
            raise InputError(bad_value("keep fractions", self.keep_fractions, "at least one", FLAG_KEEPS))
        for keep in self.keep_fractions:
            check_keep_fraction(keep, FLAG_KEEPS)
        if not isinstance(self.max_refs, int) or self.max_refs < 1:
            raise InputError(bad_value("maximum references", self.max_refs, "an integer >= 1", FLAG_MAX_REFS))
        check_reference_count(self.max_refs)
        typical = self.typical_refs
        if typical is not None and not (isinstance(typical, int) and 1 <= typical <= self.max_refs):
            raise InputError(bad_value("typical references", typical, f"1..{self.max_refs}", FLAG_TYPICAL_REFS))
        if not self.target_resolutions:
            raise InputError(bad_value("target resolutions", (), "at least one", FLAG_TARGET_RESOLUTIONS))
        for resolution in (self.ref_resolution, *self.target_resolutions):
            resolution.tokens  # raises InputError below one token
        if not isinstance(self.text_tokens, int) or self.text_tokens < 2:  # the export's least (export.spec)
            raise InputError(bad_value("text tokens", self.text_tokens, "an integer >= 2", FLAG_TEXT_TOKENS))
        check_key_tile(self.key_tile, FLAG_KEY_TILE)
        return self

    @property
    def tokens_per_ref(self) -> int:
        return self.ref_resolution.tokens

    def topped_up(self, tokens: int, refs: int, target_tokens: int | None = None) -> int:
        """``tokens`` kept of ``refs`` references as a generation with this plan's key tile keeps them: the most
        (``key_tile - 1`` more, for any target size) or, given ``target_tokens``, exactly (``whole_tile_tokens``)."""
        if not self.key_tile:
            return tokens
        available = refs * self.tokens_per_ref
        if target_tokens is None:
            return min(tokens + self.key_tile - 1, max(tokens, available))
        return whole_tile_tokens(tokens, self.text_tokens + target_tokens, self.key_tile, available)

    @cached_property  # frozen dataclasses allow this: cached_property writes the instance __dict__ directly
    def buckets(self) -> tuple[Bucket, ...]:
        """Buckets sorted by maximum, tiling 0..largest maximum; a keep whose maximum repeats a smaller keep's
        is dropped (it would get an empty range), keeping the smaller fraction's name. With a key tile each
        maximum holds the top-up, and the opt shape is topped up for the first target size."""
        self.validate()
        typical = self.typical_refs or self.max_refs
        buckets: list[Bucket] = []
        next_min = 0
        for keep in sorted(set(float(k) for k in self.keep_fractions)):
            maximum = self.topped_up(tokens_at(keep, self.max_refs, self.tokens_per_ref), self.max_refs)
            if maximum < next_min:
                continue
            opt = self.topped_up(tokens_at(keep, typical, self.tokens_per_ref), typical,
                                 self.target_resolutions[0].tokens)
            opt = min(maximum, max(next_min, opt))
            buckets.append(Bucket(keep, next_min, opt, maximum))
            next_min = maximum + 1
        return tuple(buckets)

    @property
    def max_ref_tokens(self) -> int:
        return self.buckets[-1].max_ref_tokens

    def bucket_named(self, name: str) -> Bucket:
        for bucket in self.buckets:
            if bucket.name == name:
                return bucket
        raise ProfileError(bad_value("bucket", name, ", ".join(b.name for b in self.buckets), FLAG_KEEPS))

    def bucket_for(self, ref_tokens: int, request: str | None = None) -> Bucket:
        """The smallest bucket whose range holds ``ref_tokens``; ProfileError naming a covering option if none."""
        if isinstance(ref_tokens, bool) or not isinstance(ref_tokens, int) or ref_tokens < 0:
            raise ProfileError(bad_value("reference tokens", ref_tokens, "an integer >= 0"))
        for bucket in self.buckets:  # sorted by maximum, so the first hit is the smallest
            if bucket.covers(ref_tokens):
                return bucket
        nearest = self.buckets[-1]
        asked = f"{ref_tokens} reference tokens" + (f" ({request})" if request else "")
        raise ProfileError(
            f"{asked} exceed every engine profile; nearest profile {nearest.name} holds "
            f"{nearest.min_ref_tokens}..{nearest.max_ref_tokens} (up to {self.max_refs} refs of {self.tokens_per_ref} "
            f"tokens at keep {nearest.keep_fraction:g}); {self.covering_option(ref_tokens)}"
        )

    def covering_option(self, ref_tokens: int) -> str:
        """The smallest build-option change whose buckets would hold ``ref_tokens``, as advice text."""
        for keep in KEEP_CHOICES:  # first: a larger keep fraction at the same reference count
            if keep not in self.keep_fractions and self.topped_up(tokens_at(keep, self.max_refs, self.tokens_per_ref),
                                                                  self.max_refs) >= ref_tokens:
                keeps = " ".join(f"{k:g}" for k in sorted({*self.keep_fractions, keep}))
                return f"rebuild with {FLAG_KEEPS} {keeps}"
        largest_keep = max(self.keep_fractions)
        for refs in range(self.max_refs + 1, MAX_REFERENCES + 1):  # then: more references
            if self.topped_up(tokens_at(largest_keep, refs, self.tokens_per_ref), refs) >= ref_tokens:
                return f"rebuild with {FLAG_MAX_REFS} {refs}"
        ceiling = tokens_at(1.0, MAX_REFERENCES, self.tokens_per_ref)
        return (f"no build covers it: {MAX_REFERENCES} references (the FLUX.2 limit) x {self.tokens_per_ref} "
                f"tokens hold at most {ceiling}; use fewer references or a smaller keep fraction")

    def target_token_range(self) -> tuple[int, int, int]:
        """(min, opt, max) target tokens over the declared target resolutions; opt is the first one's."""
        counts = [resolution.tokens for resolution in self.target_resolutions]
        return min(counts), counts[0], max(counts)

    def symbol_ranges(self, bucket: Bucket, step: str) -> dict[str, tuple[int, int, int]]:
        """{symbol: (min, opt, max)} for one profile: the bucket's tokens go to new or cached references."""
        none = (0, 0, 0)
        if step in ("full", "extract"):
            refs, cached = bucket.token_range, none
        elif step == "cached":
            refs, cached = none, bucket.token_range
        else:
            steps = sorted({s for group in STEPS_BY_GRAPH.values() for s in group})
            raise ProfileError(bad_value("step", step, ", ".join(steps)))
        text = (self.text_tokens,) * 3
        return {REF_TOKENS: refs, CACHED_TOKENS: cached, TARGET_TOKENS: self.target_token_range(), TEXT_TOKENS: text}

    def to_json(self) -> dict:
        return {"keep_fractions": list(self.keep_fractions), "max_refs": self.max_refs,
                "typical_refs": self.typical_refs, "ref_resolution": self.ref_resolution.name,
                "target_resolutions": [r.name for r in self.target_resolutions], "text_tokens": self.text_tokens,
                "key_tile": self.key_tile}

    @classmethod
    def from_json(cls, data: dict) -> BucketPlan:
        """Inverse of :meth:`to_json` (``engines.json`` records the plan its engines were built with)."""
        try:
            return cls(keep_fractions=tuple(float(k) for k in data["keep_fractions"]), max_refs=int(data["max_refs"]),
                       typical_refs=data.get("typical_refs"), ref_resolution=Resolution.parse(data["ref_resolution"]),
                       target_resolutions=tuple(Resolution.parse(r) for r in data["target_resolutions"]),
                       text_tokens=int(data["text_tokens"]), key_tile=int(data.get("key_tile", 0))).validate()
        except InputError as error:  # well formed, but a value out of range: say which
            raise ProfileError(f"recorded bucket plan: {error} (rebuild the engines with build_engines.py)") \
                from error
        except (KeyError, TypeError, ValueError, OverflowError) as error:  # int(Infinity) is an OverflowError
            raise ProfileError(bad_value("recorded bucket plan", data, "a plan written by build_engines.py "
                                         "(rebuild the engines)")) from error

    def build_args(self) -> tuple[str, ...]:
        """The ``build_engines.py`` options that reproduce this plan (manifests and rebuild hints record them)."""
        args = [FLAG_KEEPS, *(f"{k:g}" for k in self.keep_fractions), FLAG_MAX_REFS, str(self.max_refs)]
        if self.typical_refs is not None:
            args += [FLAG_TYPICAL_REFS, str(self.typical_refs)]
        args += [FLAG_REF_RESOLUTION, self.ref_resolution.name,
                 FLAG_TARGET_RESOLUTIONS, *(r.name for r in self.target_resolutions),
                 FLAG_TEXT_TOKENS, str(self.text_tokens)]
        if self.key_tile:
            args += [FLAG_KEY_TILE, str(self.key_tile)]
        return tuple(args)


def steps_for_graph(graph: str) -> tuple[str, ...]:
    if graph not in STEPS_BY_GRAPH:
        raise ProfileError(bad_value("graph", graph, " or ".join(GRAPH_CHOICES), "--graph"))
    return STEPS_BY_GRAPH[graph]


def add_bucket_arguments(parser: argparse.ArgumentParser) -> None:
    """The bucket options of ``build_engines.py``; choices come from this registry."""
    parser.add_argument(FLAG_KEEPS, type=float, nargs="+", choices=KEEP_CHOICES, default=list(DEFAULT_KEEP_FRACTIONS),
                        help="keep fractions, one engine profile each")
    parser.add_argument(FLAG_MAX_REFS, type=int, choices=range(1, MAX_REFERENCES + 1), default=DEFAULT_MAX_REFS)
    parser.add_argument(FLAG_TYPICAL_REFS, type=int, default=None, help="reference count the opt shapes target")
    parser.add_argument(FLAG_REF_RESOLUTION, default=DEFAULT_RESOLUTION.name, metavar="WxH",
                        help=f"reference size the profiles cover: any WIDTHxHEIGHT of whole {TOKEN_PIXELS}-px tokens "
                             "up to 1024x1024 px of area (default 1024x1024)")
    parser.add_argument(FLAG_TARGET_RESOLUTIONS, nargs="+", default=[DEFAULT_RESOLUTION.name], metavar="WxH",
                        help=f"output sizes: any WIDTHxHEIGHT of whole {TOKEN_PIXELS}-px tokens, each side up to "
                             f"{MAX_SIDE_PIXELS} px, at most {MAX_OUTPUT_PIXELS // 2**20} megapixels; the first is "
                             f"the opt shape (common: {', '.join(RESOLUTION_CHOICES)})")
    parser.add_argument(FLAG_TEXT_TOKENS, type=int, default=DEFAULT_TEXT_TOKENS)
    parser.add_argument(FLAG_KEY_TILE, type=int, default=0, metavar="N",
                        help="top the kept tokens up so the attention's keys (text + target + kept) fill whole tiles "
                             "of N: each profile holds up to N - 1 tokens more, and generations on these engines "
                             "top up by default (128: the key tile at head size 128; default 0, off)")


def plan_from_args(args: argparse.Namespace) -> BucketPlan:
    """A validated BucketPlan from the options ``add_bucket_arguments`` declared."""
    return BucketPlan(
        keep_fractions=tuple(args.keeps), max_refs=args.max_refs, typical_refs=args.typical_refs,
        ref_resolution=Resolution.parse(args.ref_resolution, FLAG_REF_RESOLUTION),
        target_resolutions=tuple(Resolution.parse(r) for r in args.target_resolutions),
        text_tokens=args.text_tokens, key_tile=args.key_tile,
    ).validate()

