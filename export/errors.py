"""Typed errors of the export stage; all are ``SparseContextError`` so the CLI reports them the same way."""

from __future__ import annotations

from sparse_context.runtime.errors import InputError, SparseContextError


class ExportError(SparseContextError):
    """An export could not be produced or reused."""


class ExportConfigError(ExportError, InputError):
    """An export option is out of range (graph, precision, attention form, opset, token bounds)."""


class ExportInterrupted(ExportError):
    """The export stopped before completion; nothing was published."""


class GraphCheckError(ExportError):
    """A written ONNX graph breaks a contract (axes, dtypes, ops, ONNX validity). ``problems`` lists each one."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message += ":\n  " + "\n  ".join(self.problems)
        super().__init__(message)


class ValidationError(ExportError):
    """onnxruntime and PyTorch disagree beyond tolerance. ``report`` holds every measured error."""

    def __init__(self, message: str, report: object = None):
        self.report = report
        super().__init__(message)


class ExportCorruptError(ExportError):
    """An export's files are missing, truncated or modified: they do not match the sizes and checksums its
    manifest records, or the manifest is not one this package wrote."""
