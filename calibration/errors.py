"""Typed errors of the calibration stage; all are ``SparseContextError`` so the CLI reports them the same way."""

from __future__ import annotations

from sparse_context.runtime.errors import InputError, SparseContextError


class CalibrationError(SparseContextError):
    """Calibration data could not be captured, read or used, or quantization failed."""


class CalibrationConfigError(CalibrationError, InputError):
    """A calibration option is out of range (mode, method, sample count, calibration set, thresholds)."""


class QuantizationUnavailableError(CalibrationError, ImportError):
    """ModelOpt (``nvidia-modelopt[onnx]``) is not installed here."""


class GateFailedError(CalibrationError):
    """The quantized graphs are not accurate enough; nothing was published. ``report`` holds every number."""

    def __init__(self, message: str, report: object = None):
        self.report = report
        super().__init__(message)
