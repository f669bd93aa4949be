"""The text encoder and VAE engines on TensorRT: one runner per part behind the part-session interface of
:mod:`sparse_context.engines.parts` (numpy in, numpy out). Each part engine holds one optimization profile,
its spec's min/opt/max (``build_engines.py`` builds it as the transformer's: parse, profile, build, manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from sparse_context.engines.parts import check_part_feeds
from sparse_context.engines.trt.runner import TrtRunner
from sparse_context.export.manifest import read_export_manifest


class TrtPartSession:
    """A part engine (``engine``) and the export it was built from (``onnx``: its manifest names the inputs)."""

    def __init__(self, engine: str | Path, onnx: str | Path, memory: Any = None, device: int = 0):
        self.manifest = read_export_manifest(onnx)
        self.graph = self.manifest["graph"]
        self.inputs: dict[str, list[Any]] = self.manifest["spec"]["inputs"]
        self.runner = TrtRunner(Path(engine), memory=memory, device=device).activate()

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_part_feeds(self.graph, self.inputs, feeds)
        outputs = self.runner.infer(dict(feeds), 0)
        # The torch memory path returns CUDA tensors; bf16 engines come back as float32 on the host.
        return {name: value.float().cpu().numpy() if hasattr(value, "cpu") else np.asarray(value)
                for name, value in outputs.items()}

    def close(self) -> None:
        self.runner.deactivate()
