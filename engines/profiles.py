"""Optimization profiles from buckets and a graph's input-shape description; trtexec-style shape strings.

An input-shape description is data, written once by the export spec: ``{input: (dim, ...)}`` where a dim is an
int (fixed) or a string. A string is a symbol (``"ref_tokens"``) or a sum of symbols and ints
(``"text_tokens + target_tokens"``), because the full graph's RoPE rows span text, target and references.
Symbols get ``(min, opt, max)`` from :meth:`BucketPlan.symbol_ranges`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence, Union

from sparse_context.engines.buckets import (
    FLAG_TARGET_RESOLUTIONS, FLAG_TEXT_TOKENS, RESOLUTION_CHOICES, RESOLUTIONS, Bucket, BucketPlan, steps_for_graph,
)
from sparse_context.engines.errors import ProfileError
from sparse_context.runtime.errors import bad_value

Dim = Union[int, str]
Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)
SHAPE_FLAGS = ("--minShapes", "--optShapes", "--maxShapes")


def dim_range(dim: Dim, ranges: Mapping[str, tuple[int, int, int]], input_name: str) -> tuple[int, int, int]:
    """(min, opt, max) of one dim: an int, a symbol, or a ``+`` sum of both kinds of term."""
    if isinstance(dim, bool):  # bool is an int subclass; True as a dim is a typo, not 1
        raise ProfileError(bad_value(f"dim of input {input_name!r}", dim, "an int >= 0 or a symbol name"))
    if isinstance(dim, int):
        if dim < 0:
            raise ProfileError(bad_value(f"dim of input {input_name!r}", dim, "an int >= 0 or a symbol name"))
        return dim, dim, dim
    if not isinstance(dim, str) or not dim.strip():
        raise ProfileError(bad_value(f"dim of input {input_name!r}", dim, "an int >= 0 or a symbol name"))
    total = [0, 0, 0]
    for term in (part.strip() for part in dim.split("+")):
        if term.isdigit():
            values = (int(term),) * 3
        elif term in ranges:
            values = ranges[term]
        else:
            raise ProfileError(
                bad_value(f"symbol in dim {dim!r} of input {input_name!r}", term, ", ".join(sorted(ranges)) or "none")
            )
        total = [t + v for t, v in zip(total, values)]
    return total[0], total[1], total[2]


def profile_shapes(input_shapes: Mapping[str, Sequence[Dim]],
                   ranges: Mapping[str, tuple[int, int, int]]) -> dict[str, ShapeRange]:
    """{input: (min_shape, opt_shape, max_shape)}; ProfileError if any dim ends up with min > opt or opt > max."""
    for symbol, (low, opt, high) in ranges.items():
        if not 0 <= low <= opt <= high:
            raise ProfileError(bad_value(f"range of symbol {symbol!r}", (low, opt, high), "0 <= min <= opt <= max"))
    shapes: dict[str, ShapeRange] = {}
    for name, dims in input_shapes.items():
        per_dim = [dim_range(dim, ranges, name) for dim in dims]
        shapes[name] = tuple(tuple(r[i] for r in per_dim) for i in range(3))  # type: ignore[assignment]
    return shapes


@dataclass(frozen=True)
class Profile:
    """One optimization profile of an engine: the bucket and step it serves and its shape ranges."""

    bucket: str
    step: str
    shapes: tuple[tuple[str, ShapeRange], ...]  # a tuple so profiles hash into cache keys

    def __post_init__(self):
        # Sorted by input name: input order means nothing to TensorRT, and JSON written with sorted keys must
        # read back as an equal profile.
        object.__setattr__(self, "shapes", tuple(sorted(self.shapes)))

    @property
    def name(self) -> str:
        return f"{self.bucket}/{self.step}"

    def shape_dict(self) -> dict[str, ShapeRange]:
        return dict(self.shapes)

    def to_json(self) -> dict:
        return {"bucket": self.bucket, "step": self.step,
                "shapes": {name: [list(s) for s in shape_range] for name, shape_range in self.shapes}}

    @classmethod
    def from_json(cls, data: Mapping) -> Profile:
        shapes = tuple((name, tuple(tuple(int(d) for d in s) for s in ranges))  # type: ignore[misc]
                       for name, ranges in data["shapes"].items())
        return cls(str(data["bucket"]), str(data["step"]), shapes)


def engine_profiles(plan: BucketPlan, graph: str, input_shapes: Mapping[str, Sequence[Dim]],
                    symbol_names: Mapping[str, str] | None = None) -> tuple[Profile, ...]:
    """Every profile of one engine, in the order they are added (that order is the profile index).

    ``symbol_names`` maps this package's symbols (``REF_TOKENS`` ...) to the export spec's, if they differ.
    """
    profiles = []
    for bucket in plan.buckets:
        for step in steps_for_graph(graph):
            ranges = plan.symbol_ranges(bucket, step)
            if symbol_names:
                ranges = {symbol_names.get(symbol, symbol): value for symbol, value in ranges.items()}
            profiles.append(Profile(bucket.name, step, tuple(profile_shapes(input_shapes, ranges).items())))
    return tuple(profiles)


def profile_index(profiles: Sequence[Profile], bucket: str, step: str) -> int:
    """Index of the (bucket, step) profile; ProfileError listing the ones the engine holds otherwise."""
    for index, profile in enumerate(profiles):
        if profile.bucket == bucket and profile.step == step:
            return index
    held = ", ".join(profile.name for profile in profiles) or "none"
    raise ProfileError(bad_value("engine profile", f"{bucket}/{step}", held))


def format_shapes(shapes: Mapping[str, Sequence[int]]) -> str:
    """``{"refs": (1, 410, 128)}`` -> ``"refs:1x410x128"``, comma-joined, as trtexec's shape options."""
    return ",".join(f"{name}:{'x'.join(str(int(d)) for d in shape)}" for name, shape in shapes.items())


def trtexec_shape_args(profile: Profile | Mapping[str, ShapeRange]) -> list[str]:
    """``["--minShapes=...", "--optShapes=...", "--maxShapes=..."]`` for users who reproduce a build with trtexec."""
    shapes = profile.shape_dict() if isinstance(profile, Profile) else dict(profile)
    return [f"{flag}={format_shapes({n: r[i] for n, r in shapes.items()})}" for i, flag in enumerate(SHAPE_FLAGS)]


def parse_shapes(text: str, flag: str = SHAPE_FLAGS[1]) -> dict[str, Shape]:
    """Parse ``name:1x410x128,name2:4`` (names may be quoted, may contain ':'; ``name:`` is a scalar)."""
    if not isinstance(text, str) or not text.strip():
        raise ProfileError(bad_value("shape list", text, "name:DxDxD[,name:DxD...]", flag))
    shapes: dict[str, Shape] = {}
    for item in text.split(","):
        name, sep, dims = item.strip().rpartition(":")  # rpartition: ONNX names like "input:0" keep their colon
        name = name.strip().strip("'\"")
        if not sep or not name:
            raise ProfileError(bad_value("shape entry", item, "name:DxDxD, e.g. refs:1x410x128", flag))
        try:
            shape = tuple(int(d) for d in dims.strip().split("x")) if dims.strip() else ()
        except ValueError:
            raise ProfileError(bad_value(f"shape of {name!r}", dims, "dims as integers joined by 'x'", flag)) from None
        if any(d < 0 for d in shape):
            raise ProfileError(bad_value(f"shape of {name!r}", dims, "dims >= 0", flag))
        if name in shapes:
            raise ProfileError(bad_value("shape entry", item, f"each input once; {name!r} repeats", flag))
        shapes[name] = shape
    return shapes


def parse_trtexec_profile(min_shapes: str, opt_shapes: str, max_shapes: str) -> dict[str, ShapeRange]:
    """Inverse of :func:`trtexec_shape_args`: three shape lists -> {input: (min, opt, max)}, checked."""
    parsed = [parse_shapes(text, flag) for text, flag in zip((min_shapes, opt_shapes, max_shapes), SHAPE_FLAGS)]
    if not (parsed[0].keys() == parsed[1].keys() == parsed[2].keys()):
        names = [sorted(p) for p in parsed]
        raise ProfileError(f"--minShapes, --optShapes and --maxShapes must name the same inputs; got {names}")
    result: dict[str, ShapeRange] = {}
    for name in parsed[0]:
        low, opt, high = (p[name] for p in parsed)
        if not len(low) == len(opt) == len(high):
            raise ProfileError(f"input {name!r}: min/opt/max shapes have different ranks: {low}, {opt}, {high}")
        if not all(a <= b <= c for a, b, c in zip(low, opt, high)):
            raise ProfileError(f"input {name!r}: need min <= opt <= max in every dim; got {low}, {opt}, {high}")
        result[name] = (low, opt, high)
    return result


@dataclass(frozen=True)
class ProfileChoice:
    """The one profile a request runs in: its bucket (whose maximum sizes the K/V buffers) and engine index."""

    bucket: Bucket
    step: str
    index: int | None  # position of the profile in the engine; None where the backend compiles no profiles


class ProfileSelector:
    """Maps each request to exactly one profile of the engines, or raises ProfileError saying what to rebuild.

    ``strict_shapes``: the backend compiled its profiles (TensorRT, onnxruntime's TensorRT EP), so target and text
    token counts must lie in the built ranges. onnxruntime CUDA/CPU graphs take any text length and any output up
    to the plan's largest: a larger one is refused as well, since its attention and VAE activations were never
    sized (a 2048^2 output on engines built for 1024^2 ran a 24 GB host out of memory in the VAE decoder).
    Reference tokens always map to a bucket: it fixes the K/V buffer size and keeps every backend inside the plan.
    """

    def __init__(self, plan: BucketPlan, profiles: Mapping[str, Sequence[Profile]] | None = None,
                 strict_shapes: bool = False):
        self.plan = plan.validate()
        self.profiles = {graph: tuple(found) for graph, found in (profiles or {}).items()}
        self.strict_shapes = strict_shapes

    def choose(self, graph: str, step: str, ref_tokens: int, target_tokens: int, text_tokens: int) -> ProfileChoice:
        """``ref_tokens``: new reference tokens (full, extract) or cached ones (cached)."""
        if step not in steps_for_graph(graph):
            raise ProfileError(bad_value(f"step of the {graph} graph", step, ", ".join(steps_for_graph(graph))))
        bucket = self.plan.bucket_for(int(ref_tokens), f"{graph}/{step} step")
        self.check_target(int(target_tokens))
        if self.strict_shapes:
            if int(text_tokens) != self.plan.text_tokens:
                raise ProfileError(f"prompt of {text_tokens} tokens: the engines were built for prompts padded to "
                                   f"{self.plan.text_tokens} tokens; pass prompt embeddings of that length or "
                                   f"rebuild with {FLAG_TEXT_TOKENS} {text_tokens}")
        held = self.profiles.get(graph)
        index = profile_index(held, bucket.name, step) if held else None
        return ProfileChoice(bucket, step, index)

    def check_target(self, target_tokens: int, size: tuple[int, int] | None = None) -> None:
        """Refuse an output the engines were not built for: outside the built range where shapes are compiled,
        larger than the largest built size elsewhere. Called per engine call and by the pipelines up front."""
        low, _, high = self.plan.target_token_range()
        if target_tokens <= high and (target_tokens >= low or not self.strict_shapes):
            return
        built = ", ".join(f"{r.name} ({r.tokens} tokens)" for r in self.plan.target_resolutions)
        wanted = next((r.name for r in RESOLUTIONS if r.tokens == target_tokens), None)
        advice = (f"rebuild with {FLAG_TARGET_RESOLUTIONS} {' '.join(r.name for r in self.plan.target_resolutions)} "
                  f"{wanted}" if wanted else f"generate at a built size (--width/--height), or rebuild with "
                  f"{FLAG_TARGET_RESOLUTIONS} (choices: {', '.join(RESOLUTION_CHOICES)})")
        where = f"outside the engines' range {low}..{high}" if self.strict_shapes else \
            f"more than the engines' largest built output ({high} tokens)"
        what = f"{size[0]}x{size[1]} px ({target_tokens} target tokens)" if size else f"{target_tokens} target tokens"
        raise ProfileError(f"output of {what} is {where} (built for {built}); {advice}")
