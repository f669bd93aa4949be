"""sparse-context: Sparse Context reference conditioning for FLUX.2-klein, from PyTorch to ONNX and TensorRT.

The package root is the repository root. Sub-packages:

- ``sparse_context.runtime``: token selection, sparse packing, the flow-match schedule and overlays
  (numpy, OpenCV and Pillow only; no torch).
- ``sparse_context.reference``: the PyTorch reference generator built on diffusers (needs ``[torch]``).
- ``sparse_context.export``, ``sparse_context.engines``, ``sparse_context.calibration``: ONNX export,
  engine builds and calibration.
"""

__version__ = "0.1.0"
