"""sparse-context: Sparse Context reference conditioning for FLUX.2-klein, from PyTorch to ONNX and TensorRT.

The package root is the repository root. Sub-packages:

- ``sparse_context.runtime``: token selection, sparse packing, the flow-match schedule, the generation core, caches
  and overlays (numpy, OpenCV and Pillow only; no torch).
- ``sparse_context.export``: ONNX export specs and the exporter (torch on use).
- ``sparse_context.calibration``: INT8/FP8 calibration.
- ``sparse_context.engines``: engine builds, ``engines.json``, the onnxruntime (``engines.ort``) and TensorRT
  (``engines.trt``) backends and the torch-free engine runtime.
- ``sparse_context.reference``: the PyTorch reference generator built on diffusers (needs ``[torch]``).

Each layer imports only the ones listed before it (``tests/test_layering.py`` checks this).
"""

__version__ = "0.1.0"
