"""One export spec per graph: names, dtypes, dynamic axes with bounds, sample inputs and min/opt/max profiles.

numpy only, so the engine builder and the runtime read the same contract without torch. Token counts come from
``runtime.tokens`` (grids, ``kept_token_count``); nothing here types a count formula of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from sparse_context.export.errors import ExportConfigError
from sparse_context.export.rope import rope_cos_sin
from sparse_context.runtime.errors import bad_value
from sparse_context.runtime.tokens import (
    grid_position_ids,
    kept_token_count,
    reference_time,
    text_position_ids,
    token_grid,
)

GRAPHS = ("full", "kv")
PRECISIONS = ("fp32", "fp16", "bf16")
NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": None}  # numpy has no bfloat16

# Symbolic dimension names (the ONNX dim_params and the keys of engine profiles).
TEXT_TOKENS = "text_tokens"
TARGET_TOKENS = "target_tokens"
REF_TOKENS = "ref_tokens"  # new reference tokens fed this call
CACHED_REF_TOKENS = "cached_ref_tokens"
# Derived axes: sums of base axes (torch.export cannot declare a sum of two dims, so they get their own name).
ROPE_TOKENS = "rope_tokens"  # full graph: text + target + refs
TEXT_TARGET_TOKENS = "text_target_tokens"  # kv graph: text + target
DERIVED_AXES = {ROPE_TOKENS: (TEXT_TOKENS, TARGET_TOKENS, REF_TOKENS), TEXT_TARGET_TOKENS: (TEXT_TOKENS, TARGET_TOKENS)}

# The kv graph's reference K/V, one tensor per layer and family: ``cached_keys_0`` ... (inputs) and ``ref_keys_0``
# ... (outputs), each (1, N, heads, head_dim). Per layer, not stacked: a stacked input is cut into its layers (a
# Split or Gather: a copy of the whole cache per call) before the attention can read them, and a stacked output is a
# Concat of every layer's K/V. The runtime keeps a state's layers back to back in one buffer, ``(layers, 1, N,
# heads, head_dim)``, and binds each layer's tensor at its offset, so nothing is copied to feed or collect them.
KV_INPUT_FAMILIES = ("cached_keys", "cached_values")
KV_OUTPUT_FAMILIES = ("ref_keys", "ref_values")


def layer_name(family: str, layer: int) -> str:
    """The name of one layer's tensor of a K/V ``family`` (``cached_keys``, ``ref_values``, ...)."""
    return f"{family}_{int(layer)}"


def layer_names(family: str, num_layers: int) -> list[str]:
    return [layer_name(family, layer) for layer in range(int(num_layers))]


def split_layers(family: str, stacked: np.ndarray) -> dict[str, np.ndarray]:
    """``{family_l: stacked[l]}``: one entry per layer of a stacked ``(layers, 1, N, H, D)`` array (views)."""
    return {layer_name(family, layer): stacked[layer] for layer in range(stacked.shape[0])}


DEFAULT_TARGET_SIZES = ((1024, 1024),)
# Four dense 1024^2 references; sparse selection keeps far fewer.
DEFAULT_MAX_REF_TOKENS = 4 * int(np.prod(token_grid(1024, 1024)))
OPT_KEEP_FRACTION = 0.1  # the profile's "opt" reference count: the keep fraction we expect most


@dataclass(frozen=True)
class ModelDims:
    """The transformer sizes the graphs depend on (from its diffusers config)."""

    in_channels: int
    text_dim: int
    heads: int
    head_dim: int
    num_layers: int  # double-stream + single-stream blocks: axis 0 of the stacked K/V
    axes_dims_rope: tuple[int, ...]
    rope_theta: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelDims":
        return cls(in_channels=int(config["in_channels"]), text_dim=int(config["joint_attention_dim"]),
                   heads=int(config["num_attention_heads"]), head_dim=int(config["attention_head_dim"]),
                   num_layers=int(config["num_layers"]) + int(config["num_single_layers"]),
                   axes_dims_rope=tuple(int(d) for d in config["axes_dims_rope"]),
                   rope_theta=float(config["rope_theta"]))


@dataclass(frozen=True)
class AxisBound:
    symbol: str
    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]  # ints are fixed; strings are symbols (base or derived)
    float32: bool = False  # rope and timestep stay float32 whatever the precision

    def dynamic_axes(self) -> dict[int, str]:
        return {axis: dim for axis, dim in enumerate(self.shape) if isinstance(dim, str)}


class GraphTensors:
    """What a graph's spec says of its tensors, shared by :class:`ExportSpec` and the parts' ``PartSpec``: names,
    dynamic axes, shapes for given sizes and the TensorRT profile. A subclass holds ``bounds``, ``inputs`` and
    ``outputs`` and says in ``resolve`` how its other symbols follow from the base sizes."""

    bounds: tuple[AxisBound, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def bound(self, symbol: str) -> AxisBound:
        return {b.symbol: b for b in self.bounds}[symbol]

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """``{tensor name: {axis: symbol}}`` for every input and output."""
        return {t.name: t.dynamic_axes() for t in self.inputs + self.outputs if t.dynamic_axes()}

    def resolve(self, sizes: Mapping[str, int]) -> dict[str, int]:
        """Every base symbol for the base ``sizes`` (missing ones take their opt value); subclasses add theirs."""
        return {b.symbol: int(sizes.get(b.symbol, b.opt)) for b in self.bounds}

    def shapes(self, sizes: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        values = self.resolve(sizes)
        return {t.name: tuple(values[d] if isinstance(d, str) else d for d in t.shape) for t in self.inputs}

    def profile(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """``{input: (min shape, opt shape, max shape)}`` for a TensorRT optimization profile."""
        corners = [self.shapes({b.symbol: getattr(b, which) for b in self.bounds}) for which in ("min", "opt", "max")]
        return {name: (corners[0][name], corners[1][name], corners[2][name]) for name in self.input_names}


@dataclass(frozen=True)
class ExportSpec(GraphTensors):
    graph: str
    precision: str
    dims: ModelDims
    bounds: tuple[AxisBound, ...]
    inputs: tuple[TensorSpec, ...] = field(default=())
    outputs: tuple[TensorSpec, ...] = field(default=())

    def resolve(self, sizes: Mapping[str, int]) -> dict[str, int]:
        """Every symbol (base and derived) for the base ``sizes``; missing base symbols take their opt value."""
        values = super().resolve(sizes)
        for derived, parts in DERIVED_AXES.items():
            values[derived] = sum(values.get(part, 0) for part in parts)
        return values

    def sample_inputs(self, sizes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
        """Random tokens and real RoPE tables (from grid position ids) for the given base sizes."""
        values = self.resolve(sizes)
        ids = sample_position_ids(values[TEXT_TOKENS], values[TARGET_TOKENS], values.get(REF_TOKENS, 0))
        return make_feeds(self, np.random.default_rng(seed), ids, values)

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph, "precision": self.precision, "dims": self.dims.__dict__,
                "bounds": {b.symbol: [b.min, b.opt, b.max] for b in self.bounds},
                "inputs": {t.name: list(t.shape) for t in self.inputs},
                "outputs": {t.name: list(t.shape) for t in self.outputs}}


def sample_position_ids(num_text: int, num_target: int, num_refs: int) -> dict[str, np.ndarray]:
    """Position ids like the pipelines': text (0,0,0,l), target one row at t=0, references one row at t=10."""
    return {"text": text_position_ids(num_text), "target": grid_position_ids(1, num_target),
            "refs": grid_position_ids(1, num_refs, time=reference_time(0))}


def make_feeds(spec: ExportSpec, rng: np.random.Generator, ids: Mapping[str, np.ndarray],
               values: Mapping[str, int]) -> dict[str, np.ndarray]:
    dims, dtype = spec.dims, NUMPY_DTYPES[spec.precision] or np.float32
    rope = lambda parts: rope_cos_sin(np.concatenate(parts, axis=0), dims.axes_dims_rope, dims.rope_theta)
    feeds = {
        "target": rng.standard_normal((1, values[TARGET_TOKENS], dims.in_channels)).astype(dtype),
        "refs": rng.standard_normal((1, values[REF_TOKENS], dims.in_channels)).astype(dtype),
        "text": rng.standard_normal((1, values[TEXT_TOKENS], dims.text_dim)).astype(dtype),
        "timestep": np.array([rng.uniform(0.05, 1.0)], dtype=np.float32),
    }
    if spec.graph == "full":
        feeds["rope_cos"], feeds["rope_sin"] = rope([ids["text"], ids["target"], ids["refs"]])
    else:
        feeds["rope_cos"], feeds["rope_sin"] = rope([ids["text"], ids["target"]])
        feeds["ref_rope_cos"], feeds["ref_rope_sin"] = rope([ids["refs"]])
        cache_shape = (dims.num_layers, 1, values[CACHED_REF_TOKENS], dims.heads, dims.head_dim)
        for family in KV_INPUT_FAMILIES:
            feeds.update(split_layers(family, rng.standard_normal(cache_shape).astype(dtype)))
    return feeds


def target_token_counts(target_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Tokens of each (width, height) target size in pixels."""
    return [int(np.prod(token_grid(int(w), int(h)))) for w, h in target_sizes]


def build_spec(graph: str, precision: str, dims: ModelDims, text_tokens: int,
               target_sizes: Sequence[tuple[int, int]] = DEFAULT_TARGET_SIZES,
               max_ref_tokens: int = DEFAULT_MAX_REF_TOKENS) -> ExportSpec:
    """The spec of ``graph`` for a model, a padded prompt length, the target sizes and a reference budget."""
    if graph not in GRAPHS:
        raise ExportConfigError(bad_value("graph", graph, " or ".join(GRAPHS), "--graph"))
    if precision not in PRECISIONS:
        raise ExportConfigError(bad_value("precision", precision, " or ".join(PRECISIONS), "--precision"))
    if not target_sizes:
        raise ExportConfigError(bad_value("target sizes", list(target_sizes), "at least one WxH", "--target-size"))
    if int(max_ref_tokens) < 2:
        # The exporter needs an example of at least 2 tokens (0 and 1 are specialised into constants).
        raise ExportConfigError(bad_value("max reference tokens", max_ref_tokens, "an integer >= 2", "--max-ref-tokens"))
    if int(text_tokens) < 2:
        # Like the reference tokens: an example of 1 token would be specialised into a constant.
        raise ExportConfigError(bad_value("text tokens", text_tokens, "an integer >= 2", "--text-tokens"))
    counts = target_token_counts(target_sizes)
    if min(counts) < 2:
        raise ExportConfigError(bad_value("target sizes", list(target_sizes), "sizes of at least 2 tokens (32x16 px)",
                                          "--target-size"))
    refs = AxisBound(REF_TOKENS, 0, kept_token_count(int(max_ref_tokens), OPT_KEEP_FRACTION), int(max_ref_tokens))
    bounds = [AxisBound(TEXT_TOKENS, 1, int(text_tokens), int(text_tokens)),
              AxisBound(TARGET_TOKENS, min(counts), max(counts), max(counts)), refs]
    tokens = lambda sym: (1, sym, dims.in_channels)
    inputs = [TensorSpec("target", tokens(TARGET_TOKENS)), TensorSpec("refs", tokens(REF_TOKENS)),
              TensorSpec("text", (1, TEXT_TOKENS, dims.text_dim)), TensorSpec("timestep", (1,), float32=True)]
    outputs = [TensorSpec("velocity", tokens(TARGET_TOKENS))]
    if graph == "full":
        inputs += [TensorSpec(n, (ROPE_TOKENS, dims.head_dim), float32=True) for n in ("rope_cos", "rope_sin")]
    else:
        bounds.append(AxisBound(CACHED_REF_TOKENS, 0, refs.opt, refs.max))
        kv = lambda sym: (1, sym, dims.heads, dims.head_dim)  # one layer's K or V
        inputs += [TensorSpec(n, (TEXT_TARGET_TOKENS, dims.head_dim), float32=True) for n in ("rope_cos", "rope_sin")]
        inputs += [TensorSpec(n, (REF_TOKENS, dims.head_dim), float32=True) for n in ("ref_rope_cos", "ref_rope_sin")]
        inputs += [TensorSpec(name, kv(CACHED_REF_TOKENS)) for family in KV_INPUT_FAMILIES
                   for name in layer_names(family, dims.num_layers)]
        outputs += [TensorSpec(name, kv(REF_TOKENS)) for family in KV_OUTPUT_FAMILIES
                    for name in layer_names(family, dims.num_layers)]
    return ExportSpec(graph, precision, dims, tuple(bounds), tuple(inputs), tuple(outputs))


def example_sizes(spec: ExportSpec) -> dict[str, int]:
    """Sizes traced at export: >= 2 (0/1 get specialised), pairwise different, and outside :func:`check_grid`."""
    refs = spec.bound(REF_TOKENS).max
    example = {TEXT_TOKENS: spec.bound(TEXT_TOKENS).max, TARGET_TOKENS: spec.bound(TARGET_TOKENS).min,
               REF_TOKENS: 4 if refs >= 8 else 2}
    if spec.graph == "kv":
        example[CACHED_REF_TOKENS] = example[REF_TOKENS] + 2 if refs >= 8 else 3 if refs >= 3 else 2
    return example


def check_grid(spec: ExportSpec) -> list[int]:
    """Reference-token counts to validate at: 0, 1, an odd count and the maximum, never the traced example."""
    top = spec.bound(REF_TOKENS).max
    example = example_sizes(spec)[REF_TOKENS]
    odd = next((n for n in range(top - 1, 2, -1) if n % 2 == 1 and n != example), None)
    grid = [0, 1] + ([odd] if odd else []) + [top]
    return sorted({n for n in grid if n != example})
