"""Typed errors of the engine stage. Messages say what was given, what is allowed and how to rebuild."""

from __future__ import annotations

from sparse_context.runtime.errors import InputError, SparseContextError

# The design card places the engine builder at the repository root; every rebuild hint names it.
REBUILD_PROGRAM = "python build_engines.py"


class EngineError(SparseContextError):
    """An engine cannot be built, stored, found or run as asked."""


class ProfileError(InputError):
    """A shape or token count lies outside every optimization profile, or a profile description is malformed."""


class EngineMismatchError(EngineError):
    """The engine was built for another TensorRT version or GPU compute capability than the one running."""


class EngineCorruptError(EngineError):
    """The engine or its manifest is missing, unreadable, or does not match its recorded checksum."""


class EngineBuildError(EngineError):
    """TensorRT could not parse the ONNX graph or build the engine. ``problems`` lists each reported error."""

    def __init__(self, message: str, problems: list[str] | None = None):
        self.problems = list(problems or [])
        if self.problems:
            message += ":\n  " + "\n  ".join(self.problems)
        super().__init__(message)


class BuildOptionError(EngineBuildError, InputError):
    """A builder option is invalid for this TensorRT version (unknown flag, precision flag on TensorRT >= 11)."""


class TensorRTUnavailableError(EngineError, ImportError):
    """``tensorrt`` (or cuda-python / a CUDA device) is not installed here."""


class RunnerError(EngineError):
    """The TensorRT runner was used out of order (infer before activate) or a CUDA call failed."""


def rebuild_hint(build_args: tuple[str, ...] | list[str] = ()) -> str:
    """``rebuild it with: python build_engines.py <args>`` — the args recorded in the manifest, when known."""
    command = " ".join([REBUILD_PROGRAM, *build_args])
    return f"rebuild it on this machine with: {command}"


class BackendOptionError(EngineError, InputError):
    """An engine backend was asked for something it cannot do: a provider, a device, a graph it did not load, or
    a K/V state from another backend."""


class EnginesIndexError(EngineError, InputError):
    """``engines.json`` is missing, unreadable, of another format version, or lacks a field it must have."""


class FixedAtBuildError(EngineError, InputError):
    """An option asked of engines was fixed when they were built (weights, LoRA, precision); only a rebuild
    changes it. The message names the ``build_engines.py`` command that would."""
