"""The declared quantization recipe: mode, calibration method and which layers stay in high precision.

Layers are chosen by the module path the exporter records on every ONNX node (``pkg.torch.onnx.name_scopes``),
so one recipe names the same layers in the full and the KV graph, whose node names differ. The recipe's hash goes
into the capture, quantized-graph and engine cache keys: changing any field gives new artifacts.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from sparse_context.calibration.errors import CalibrationConfigError
from sparse_context.runtime.errors import bad_value

MODES = ("int8", "fp8")
CALIBRATION_METHODS = ("max", "entropy")
HIGH_PRECISION_DTYPES = ("fp32", "fp16")
# Module-path patterns of the layer groups a recipe can keep in high precision. Embeddings and modulation feed
# every block (an error there reaches all tokens), the final projection writes the velocity itself, and the
# attention group keeps the softmax and both attention matmuls out of Q/DQ.
LAYER_GROUPS = {
    "embeddings": r"transformer\.(x_embedder|context_embedder|time_guidance_embed)(\..*)?",
    "modulation": r"transformer\.([a-z_]*modulation[a-z_]*|norm_out)(\..*)?",
    "final_projection": r"transformer\.proj_out(\..*)?",
    "attention": None,  # ModelOpt's MHA switch, not a module path: the attention matmuls have no module
}
DEFAULT_HIGH_PRECISION = tuple(LAYER_GROUPS)
QUANTIZED_OP_TYPES = ("MatMul", "Gemm")  # the layers the blame report compares
NAME_SCOPES = "pkg.torch.onnx.name_scopes"

FLAG_EXCLUDE = "--calibration-exclude"
FLAG_METHOD = "--calibration-method"


@dataclass(frozen=True)
class QuantRecipe:
    """What to quantize and how. ``exclude``: extra module paths or node names (regular expressions, matched
    in full) kept in high precision. ``range_scale`` multiplies every calibrated activation range (1: as
    calibrated; below 1 clips, which the accuracy gate must refuse)."""

    mode: str
    calibration_method: str = "max"
    high_precision: tuple[str, ...] = DEFAULT_HIGH_PRECISION
    exclude: tuple[str, ...] = ()
    high_precision_dtype: str = "fp32"
    range_scale: float = 1.0

    def validate(self) -> "QuantRecipe":
        if self.mode not in MODES:
            raise CalibrationConfigError(bad_value("quantization mode", self.mode, ", ".join(MODES), "--precision"))
        if self.calibration_method not in CALIBRATION_METHODS:
            raise CalibrationConfigError(bad_value("calibration method", self.calibration_method,
                                                   ", ".join(CALIBRATION_METHODS), FLAG_METHOD))
        unknown = [group for group in self.high_precision if group not in LAYER_GROUPS]
        if unknown:
            raise CalibrationConfigError(bad_value("high-precision layer groups", unknown, ", ".join(LAYER_GROUPS)))
        if self.high_precision_dtype not in HIGH_PRECISION_DTYPES:
            raise CalibrationConfigError(bad_value("high-precision dtype", self.high_precision_dtype,
                                                   ", ".join(HIGH_PRECISION_DTYPES)))
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as error:
                raise CalibrationConfigError(bad_value("layer to exclude", pattern, f"a regular expression "
                                                       f"({error})", FLAG_EXCLUDE)) from None
        if not 0.0 < float(self.range_scale) <= 1.0:
            raise CalibrationConfigError(bad_value("range scale", self.range_scale, "0 < scale <= 1"))
        return self

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["high_precision"] = sorted(self.high_precision)
        data["exclude"] = list(self.exclude)
        return data

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()

    @property
    def keeps_attention(self) -> bool:
        return "attention" in self.high_precision

    def patterns(self) -> list[str]:
        """Every module-path / node-name pattern this recipe keeps in high precision."""
        groups = [LAYER_GROUPS[g] for g in self.high_precision if LAYER_GROUPS[g] is not None]
        return groups + list(self.exclude)

    def nodes_to_exclude(self, model: Any) -> list[str]:
        """Names of the nodes of an ONNX ``model`` that this recipe keeps in high precision."""
        compiled = [re.compile(p) for p in self.patterns()]
        return [node.name for node in model.graph.node
                if any(p.fullmatch(node.name) or p.fullmatch(module_path(node)) for p in compiled)]


def module_path(node: Any) -> str:
    """The innermost PyTorch module a node came from (``transformer.proj_out``), or "" if it has none."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            try:
                scopes = [s for s in json.loads(prop.value.replace("'", '"')) if s]
            except ValueError:
                return ""
            modules = [s for s in scopes[:-1] if "." in s]  # the last scope is the op's own name
            return modules[-1] if modules else ""
    return ""


def describe_node(node: Any) -> str:
    path = module_path(node)
    return f"{node.name} ({path})" if path else node.name


def layer_names(nodes: Iterable[Any]) -> dict[str, str]:
    """``{node name: what --calibration-exclude should be given to keep it in high precision}``."""
    return {node.name: module_path(node) or node.name for node in nodes}
