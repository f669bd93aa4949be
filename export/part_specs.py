"""Export specs of the parts around the transformer: VAE encoder, VAE decoder and the Qwen3 text encoder.

numpy only, like :mod:`~sparse_context.export.spec`: the engine builder reads the same names, dynamic axes and
min/opt/max profiles without torch. Pixel sizes are whole tokens (16 px, ``runtime.tokens.TOKEN_PIXELS``): the
image axes are declared as ``TOKEN_PIXELS * latent rows/cols``, so a profile can never ask for a size the pipeline
would have cropped, and token counts come from :func:`~sparse_context.runtime.tokens.token_grid`.

Graphs (all batch 1):

- ``vae_encoder``: ``image`` (1, 3, H, W) in [-1, 1] -> ``latents`` (1, 128, H/16, W/16), the normalised, patchified
  grid the Klein pipeline packs into reference tokens (the runtime takes ``latents[0]``).
- ``vae_decoder``: ``latents`` (1, 128, rows, cols), the unpacked target grid -> ``image`` (1, 3, 16 rows, 16 cols)
  in [-1, 1] before the pipeline's postprocessing.
- ``text_encoder``: ``input_ids`` and ``attention_mask`` (1, L) int64 -> ``prompt_embeds`` (1, L, layers x hidden).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from sparse_context.export.errors import ExportConfigError
from sparse_context.export.spec import PRECISIONS, AxisBound, GraphTensors, TensorSpec
from sparse_context.runtime.errors import bad_value
from sparse_context.runtime.tokens import LATENT_CHANNELS, TOKEN_PIXELS, token_grid

PARTS = ("vae_encoder", "vae_decoder", "text_encoder")

# Symbolic dimension names (dim_params of inputs and keys of profiles).
LATENT_ROWS = "latent_rows"
LATENT_COLS = "latent_cols"
TEXT_TOKENS = "text_tokens"  # the same name as the transformer spec's text axis: the same tensor flows on
# Pixel axes: TOKEN_PIXELS x a latent axis (torch.export derived dims; the exporter writes "16*latent_rows").
IMAGE_HEIGHT = "image_height"
IMAGE_WIDTH = "image_width"
PIXEL_AXES = {IMAGE_HEIGHT: LATENT_ROWS, IMAGE_WIDTH: LATENT_COLS}

# References are resized to at most 1024^2 px area (aspect ratio kept): 1:2 to 2:1 at full area, down to 256^2.
DEFAULT_REFERENCE_RESOLUTIONS = ((1024, 1024), (1440, 720), (720, 1440), (256, 256))
DEFAULT_TARGET_RESOLUTIONS = ((1024, 1024), (512, 512))
MAX_TEXT_TOKENS = 512  # Klein's max_sequence_length; prompts are padded to it


@dataclass(frozen=True)
class PartSpec(GraphTensors):
    """Names, dynamic axes and bounds of one part graph; an :class:`ExportSpec`'s tensors for ``check_graph``."""

    graph: str
    precision: str
    bounds: tuple[AxisBound, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    settings: tuple[tuple[str, Any], ...] = ()  # part-specific facts that change the graph (text layers)

    def resolve(self, sizes: Mapping[str, int]) -> dict[str, int]:
        """Every symbol for the base ``sizes`` (missing ones take their opt value); pixel axes are 16 x latent."""
        values = super().resolve(sizes)
        for pixel, latent in PIXEL_AXES.items():
            if latent in values:
                values[pixel] = TOKEN_PIXELS * values[latent]
        return values

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph, "precision": self.precision,
                "bounds": {b.symbol: [b.min, b.opt, b.max] for b in self.bounds},
                "inputs": {t.name: list(t.shape) for t in self.inputs},
                "outputs": {t.name: list(t.shape) for t in self.outputs},
                "settings": {key: value for key, value in self.settings}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "PartSpec":
        """The spec an export manifest recorded (``manifest["spec"]``)."""
        bounds = tuple(AxisBound(symbol, *map(int, values)) for symbol, values in data["bounds"].items())
        tensors = lambda table: tuple(TensorSpec(name, tuple(shape)) for name, shape in table.items())
        return cls(data["graph"], data["precision"], bounds, tensors(data["inputs"]), tensors(data["outputs"]),
                   tuple(data.get("settings", {}).items()))


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ExportConfigError(bad_value("precision", precision, " or ".join(PRECISIONS), "--precision"))


def resolution_bounds(resolutions: Sequence[tuple[int, int]], opt: tuple[int, int] | None = None,
                      flag: str = "--target-resolutions") -> tuple[AxisBound, AxisBound]:
    """(rows, cols) bounds covering every (width, height) in pixels; opt is ``opt`` or the largest area."""
    sizes = [(int(w), int(h)) for w, h in resolutions]
    if not sizes:
        raise ExportConfigError(bad_value("resolutions", list(resolutions), "at least one WxH", flag))
    odd = [f"{w}x{h}" for w, h in sizes if w % TOKEN_PIXELS or h % TOKEN_PIXELS or w < TOKEN_PIXELS
           or h < TOKEN_PIXELS]
    if odd:
        raise ExportConfigError(bad_value("resolutions", odd, f"positive multiples of {TOKEN_PIXELS} px", flag))
    grids = [token_grid(w, h) for w, h in sizes]  # (rows, cols)
    best = token_grid(*opt) if opt is not None else max(grids, key=lambda g: (g[0] * g[1], g))
    rows = AxisBound(LATENT_ROWS, min(g[0] for g in grids), best[0], max(g[0] for g in grids))
    cols = AxisBound(LATENT_COLS, min(g[1] for g in grids), best[1], max(g[1] for g in grids))
    if not (rows.min <= rows.opt <= rows.max and cols.min <= cols.opt <= cols.max):
        raise ExportConfigError(bad_value("opt resolution", opt, "a size inside the resolutions' range", flag))
    return rows, cols


def vae_encoder_spec(resolutions: Sequence[tuple[int, int]] = DEFAULT_REFERENCE_RESOLUTIONS,
                     precision: str = "fp32", opt: tuple[int, int] | None = None) -> PartSpec:
    """Prepared reference image -> normalised, patchified latent grid, for references of ``resolutions``."""
    _check_precision(precision)
    bounds = resolution_bounds(resolutions, opt, "--ref-resolution")
    image = TensorSpec("image", (1, 3, IMAGE_HEIGHT, IMAGE_WIDTH))
    latents = TensorSpec("latents", (1, LATENT_CHANNELS, LATENT_ROWS, LATENT_COLS))
    return PartSpec("vae_encoder", precision, bounds, (image,), (latents,))


def vae_decoder_spec(resolutions: Sequence[tuple[int, int]] = DEFAULT_TARGET_RESOLUTIONS,
                     precision: str = "fp32", opt: tuple[int, int] | None = None) -> PartSpec:
    """Target latent grid (unpacked with ``runtime.packing.unpack_grid``) -> image in [-1, 1]."""
    _check_precision(precision)
    bounds = resolution_bounds(resolutions, opt, "--target-size")
    latents = TensorSpec("latents", (1, LATENT_CHANNELS, LATENT_ROWS, LATENT_COLS))
    image = TensorSpec("image", (1, 3, IMAGE_HEIGHT, IMAGE_WIDTH))
    return PartSpec("vae_decoder", precision, bounds, (latents,), (image,))


def text_encoder_spec(hidden_size: int, layers: Sequence[int], max_tokens: int = MAX_TEXT_TOKENS,
                      precision: str = "fp32", min_tokens: int = 1, opt_tokens: int | None = None) -> PartSpec:
    """Token ids + mask -> Klein prompt embeddings (the ``layers`` hidden states side by side)."""
    _check_precision(precision)
    layers = tuple(int(k) for k in layers)
    if not layers or min(layers) < 0:
        raise ExportConfigError(bad_value("text encoder layers", list(layers), "hidden-state indices >= 0"))
    if not 1 <= int(min_tokens) <= int(max_tokens):
        raise ExportConfigError(bad_value("text token range", (min_tokens, max_tokens),
                                          "1 <= min <= max (the prompt length)", "--text-tokens"))
    opt = int(max_tokens if opt_tokens is None else opt_tokens)  # Klein pads every prompt to the maximum
    if not int(min_tokens) <= opt <= int(max_tokens):
        raise ExportConfigError(bad_value("opt text tokens", opt, f"{min_tokens}..{max_tokens}", "--text-tokens"))
    bounds = (AxisBound(TEXT_TOKENS, int(min_tokens), opt, int(max_tokens)),)
    inputs = (TensorSpec("input_ids", (1, TEXT_TOKENS)), TensorSpec("attention_mask", (1, TEXT_TOKENS)))
    outputs = (TensorSpec("prompt_embeds", (1, TEXT_TOKENS, len(layers) * int(hidden_size))),)
    return PartSpec("text_encoder", precision, bounds, inputs, outputs, (("layers", list(layers)),))


def example_sizes(spec: PartSpec) -> dict[str, int]:
    """Sizes traced at export: >= 2 (0 and 1 get specialised) and different per axis (so none are unified)."""
    if spec.graph == "text_encoder":
        return {TEXT_TOKENS: 8}
    return {LATENT_ROWS: 4, LATENT_COLS: 5}  # 64 x 80 px


def check_sizes(spec: PartSpec) -> list[dict[str, int]]:
    """Sizes to validate at, never the traced one: the bounds' corners and an odd size in between."""
    example = example_sizes(spec)
    if spec.graph == "text_encoder":
        bound = spec.bound(TEXT_TOKENS)
        counts = sorted({bound.min, bound.max, max(bound.min, min(bound.max, 13))} - {example[TEXT_TOKENS]})
        return [{TEXT_TOKENS: n} for n in counts]
    rows, cols = spec.bound(LATENT_ROWS), spec.bound(LATENT_COLS)
    sizes = [{LATENT_ROWS: rows.min, LATENT_COLS: cols.max}, {LATENT_ROWS: rows.max, LATENT_COLS: cols.min}]
    return [s for s in sizes if s != example]


def sample_inputs(spec: PartSpec, sizes: Mapping[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of the given sizes: images in [-1, 1], unit-normal latents, ids with a padded tail."""
    rng = np.random.default_rng(seed)
    shapes = spec.shapes(sizes)
    dtype = np.float16 if spec.precision == "fp16" else np.float32
    if spec.graph == "vae_encoder":
        return {"image": rng.uniform(-1.0, 1.0, shapes["image"]).astype(dtype)}
    if spec.graph == "vae_decoder":
        return {"latents": rng.standard_normal(shapes["latents"]).astype(dtype)}
    length = shapes["input_ids"][1]
    mask = np.zeros((1, length), np.int64)
    mask[0, : max(1, (2 * length) // 3)] = 1
    return {"input_ids": rng.integers(0, 100, (1, length), dtype=np.int64), "attention_mask": mask}


# The same values as reference.generator's KLEIN_TEXT_LAYERS / KLEIN_MAX_SEQUENCE_LENGTH (that module imports
# torch; this one must not). A test checks they agree.
KLEIN_TEXT_LAYERS = (9, 18, 27)
SETTINGS_FILE = "sparse_context.json"


def text_settings(model_dir: Any) -> tuple[tuple[int, ...], int]:
    """(hidden-state layers, max_sequence_length) of a model folder: its ``sparse_context.json`` or Klein's."""
    import json
    from pathlib import Path

    path = Path(model_dir) / SETTINGS_FILE
    settings = json.loads(path.read_text()) if path.is_file() else {}
    layers = tuple(int(k) for k in settings.get("text_encoder_out_layers", KLEIN_TEXT_LAYERS))
    return layers, int(settings.get("max_sequence_length", MAX_TEXT_TOKENS))
