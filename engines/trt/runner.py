"""Run a verified TensorRT engine: activate -> infer (per call: profile, shapes, addresses) -> deactivate.

Buffers are allocated once at activation, at the largest shape any profile allows, so a call never allocates;
a call picks its bucket's profile and sets the real shapes. ``tensorrt`` is imported lazily.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from sparse_context.engines.trt.memory import ALIGNMENT, default_memory
from sparse_context.engines.errors import EngineCorruptError, ProfileError, RunnerError
from sparse_context.engines.manifest import EngineManifest, read_manifest, verify_engine
from sparse_context.engines.profiles import Profile
from sparse_context.engines.trt.loader import logged_errors, import_tensorrt, make_logger
from sparse_context.runtime.errors import bad_value


def _itemsize(dtype_name: str) -> int:
    # Sizes of TensorRT DataType names (BF16 has no numpy dtype, so no np.dtype lookup here).
    sizes = {"FLOAT": 4, "HALF": 2, "BF16": 2, "INT32": 4, "INT64": 8, "INT8": 1, "UINT8": 1, "BOOL": 1, "FP8": 1}
    if dtype_name not in sizes:
        raise RunnerError(bad_value("engine tensor type", dtype_name, ", ".join(sizes) + " (an engine built by "
                                    "build_engines.py has no other; rebuild it)"))
    return sizes[dtype_name]


@dataclass(frozen=True)
class DeviceTensor:
    """A tensor the caller keeps in device memory: bound by address, never copied by the runner.

    ``capacity`` (bytes) bounds what an output may write there (the K/V buffers are sized at a bucket maximum).
    """

    pointer: int
    shape: tuple[int, ...]
    capacity: int | None = None


class TrtRunner:
    """One engine, one execution context, one stream. Use as ``with TrtRunner(path) as runner: runner.infer(...)``.

    ``external``: tensors the caller always passes as :class:`DeviceTensor` (the reference K/V), so the runner
    allocates nothing for them. ``static``: inputs uploaded once per source object and reused while the same object
    comes back (prompt embeddings, packed references, RoPE tables across denoising steps).
    """

    def __init__(self, engine_path: str | os.PathLike, manifest: EngineManifest | None = None, *,
                 memory: Any = None, device: int = 0, external: Iterable[str] = (), static: Iterable[str] = ()):
        self.engine_path = Path(engine_path)
        self.manifest = manifest
        self._memory, self._device = memory, device
        self.engine = self.context = None
        self._buffers: dict[str, Any] = {}
        self.external = frozenset(external)
        self.static = frozenset(static)
        self._uploaded: dict[str, tuple[Any, int]] = {}  # static input -> (source object, its address)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def activate(self) -> TrtRunner:
        try:
            self.memory = self._memory or default_memory(self._device)
            self._owns_memory = self._memory is None
            with _current(self.memory):
                return self._activate()
        except BaseException:
            self.deactivate()  # a half-activated runner must not keep a stream or buffers
            raise

    def _activate(self) -> TrtRunner:
        trt = import_tensorrt()
        self.manifest = self.manifest or read_manifest(self.engine_path)
        device = self.memory.device_info()
        # 1. refuse engines from another TensorRT / GPU, or with a bad checksum, before TensorRT reads a byte
        data = verify_engine(self.engine_path, self.manifest, trt.__version__, device.compute_capability)
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        if "VERSION_COMPATIBLE" in self.manifest.build_flags:
            # A version-compatible plan embeds the lean runtime it runs on: TensorRT loads it only when allowed.
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineCorruptError(f"TensorRT could not deserialize {self.engine_path}: "
                                     f"{'; '.join(logged_errors(self.logger)) or 'no reason given'}; "
                                     f"{self.manifest.rebuild()}")
        if self.engine.num_optimization_profiles != len(self.manifest.profiles):
            raise EngineCorruptError(f"engine {self.engine_path} holds {self.engine.num_optimization_profiles} "
                                     f"profiles, its manifest lists {len(self.manifest.profiles)}; "
                                     f"{self.manifest.rebuild()}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RunnerError(f"could not create an execution context for {self.engine_path} (GPU memory?)")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: self.engine.get_tensor_dtype(n).name for n in names}
        # 2. one buffer per tensor at its largest size over all profiles
        unknown = self.external - set(names)
        if unknown:
            raise RunnerError(bad_value("external tensors", sorted(unknown), ", ".join(names)))
        self.static = self.static & set(names)  # a hint: names this engine lacks do not matter
        for name, nbytes in self._max_bytes().items():
            if name not in self.external:
                self._buffers[name] = self.memory.alloc(nbytes)
        self._active_profile = None
        return self

    def deactivate(self) -> None:
        memory = getattr(self, "memory", None)
        with _current(memory):
            if memory is not None and self._buffers:
                memory.synchronize()  # queued calls (synchronize=False) may still read or write these buffers
            for buffer in self._buffers.values():
                memory.free(buffer)
            self._buffers.clear()
            self._uploaded.clear()
            self.context = self.engine = None  # release before the runtime that created them
            if memory is not None and getattr(self, "_owns_memory", False):
                memory.close()  # an injected memory object belongs to the caller
        self.memory = None

    def __enter__(self) -> TrtRunner:
        return self.activate()

    def __exit__(self, *exc) -> None:
        self.deactivate()

    # -- inference -----------------------------------------------------------------------------------------
    def profile_index(self, profile: str | int) -> int:
        """Index of a profile given as ``"keep0.10/extract"`` or an int."""
        profiles = self._require_active().profiles
        if isinstance(profile, int) and 0 <= profile < len(profiles):
            return profile
        for index, candidate in enumerate(profiles):
            if candidate.name == profile:
                return index
        raise ProfileError(bad_value("engine profile", profile, ", ".join(p.name for p in profiles)))

    def infer(self, feed: Mapping[str, Any], profile: str | int,
              into: Mapping[str, DeviceTensor] | None = None, synchronize: bool = True) -> dict[str, Any]:
        """Run one call in ``profile``; returns {output: array} (numpy, or torch CUDA tensors on the torch path).

        ``feed`` values are host/torch arrays (copied into the runner's buffers) or :class:`DeviceTensor` (bound in
        place). Outputs named in ``into`` are written to those addresses and returned as DeviceTensors of their
        real shape; the others are downloaded. ``synchronize=False`` returns with the call still queued on the
        memory's stream (every runner of one memory object shares it, so later calls run after it): downloaded
        outputs are valid only after the memory's ``synchronize()``.
        """
        manifest = self._require_active()
        with _current(self.memory):
            return self._infer(manifest, profile, feed, into, synchronize)

    def _infer(self, manifest: EngineManifest, profile: str | int, feed: Mapping[str, Any],
               into: Mapping[str, DeviceTensor] | None, synchronize: bool) -> dict[str, Any]:
        index = self.profile_index(profile)
        into = dict(into or {})
        missing, extra = set(self.inputs) - set(feed), set(feed) - set(self.inputs)
        if missing or extra or set(into) - set(self.outputs):
            raise ProfileError(f"tensors do not match the engine: missing inputs {sorted(missing)}, unknown inputs "
                               f"{sorted(extra)}, unknown outputs {sorted(set(into) - set(self.outputs))}")
        stream = self.memory.stream_handle
        if index != self._active_profile:  # switching has a cost; consecutive calls of one bucket skip it
            self._switch_profile(index, stream)
            self._active_profile = index
        for name in self.inputs:
            value = feed[name]
            shape = tuple(int(d) for d in value.shape)
            self._check_in_profile(manifest.profiles[index], name, shape)
            if not self.context.set_input_shape(name, shape):
                raise ProfileError(f"input {name!r} shape {shape} does not satisfy profile "
                                   f"{manifest.profiles[index].name}: {'; '.join(logged_errors(self.logger))}")
            self._bind(name, self._input_address(name, value))
        results: dict[str, Any] = {}
        for name in self.outputs:
            if name in into:
                target = into[name]
                shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
                needed = int(np.prod(shape, dtype=np.int64)) * _itemsize(self.dtypes[name])
                if target.capacity is not None and needed > target.capacity:
                    raise RunnerError(f"output {name!r} of shape {shape} needs {needed} bytes; the buffer given "
                                      f"holds {target.capacity}")
                self._bind(name, int(target.pointer))
                results[name] = DeviceTensor(int(target.pointer), shape, target.capacity)
            elif name in self.external:
                raise RunnerError(f"output {name!r} is external: pass its buffer in `into`")
            else:
                self._bind(name, self.memory.pointer(self._buffers[name]))
        if not self.context.execute_async_v3(stream):
            raise RunnerError(f"execute_async_v3 failed: {'; '.join(logged_errors(self.logger)) or 'see log'}")
        for name in self.outputs:
            if name not in into:
                results[name] = self.memory.download(self._buffers[name], tuple(self.context.get_tensor_shape(name)),
                                                      self.dtypes[name])
        if synchronize:
            self.memory.synchronize()
        return results

    def _input_address(self, name: str, value: Any) -> int:
        if isinstance(value, DeviceTensor):
            self._uploaded.pop(name, None)
            return int(value.pointer)
        if name in self.external:
            raise RunnerError(f"input {name!r} is external: pass it as a DeviceTensor")
        held = self._uploaded.get(name)
        if name in self.static and held is not None and held[0] is value:
            return held[1]  # that address still holds this very object
        pointer = self.memory.upload(self._buffers[name], value, self.dtypes[name])
        if name in self.static:
            self._uploaded[name] = (value, pointer)  # holding it keeps its id from being reused
        return pointer

    # -- helpers -------------------------------------------------------------------------------------------
    def _switch_profile(self, index: int, stream: int) -> None:
        """The Python binding raises RuntimeError where the C++ call returns false (an index out of range, a
        context that cannot take the profile); both become a RunnerError naming the profile and the fix."""
        problem = None
        try:
            accepted = self.context.set_optimization_profile_async(index, stream)
        except RuntimeError as error:
            accepted, problem = False, str(error)
        if not accepted:
            reasons = "; ".join([p for p in [problem] if p] + logged_errors(self.logger)) or "no reason given"
            profiles = self.manifest.profiles
            raise RunnerError(f"TensorRT refused profile {index} ({profiles[index].name}) of {len(profiles)} "
                              f"for {self.engine_path.name}: {reasons}; rebuild the engines with build_engines.py "
                              f"(the engine may hold other profiles than its manifest records)")

    def _bind(self, name: str, pointer: int) -> None:
        """``set_tensor_address`` with TensorRT's two conditions checked: a 256-byte aligned address, and the
        call's own verdict (TensorRT only logs why it refuses one)."""
        if pointer % ALIGNMENT:
            raise RunnerError(f"tensor {name!r}: address {pointer:#x} is not {ALIGNMENT}-byte aligned (offset "
                              f"{pointer % ALIGNMENT}), which TensorRT requires of every tensor it is given; bind a "
                              f"buffer from the backend's memory or pool, or copy the tensor to an aligned one")
        if self.context.set_tensor_address(name, int(pointer)) is False:
            raise RunnerError(f"TensorRT refused the address {pointer:#x} for tensor {name!r}: "
                              f"{'; '.join(logged_errors(self.logger)) or 'no reason given'}")

    def _require_active(self) -> EngineManifest:
        if self.context is None:
            raise RunnerError("TrtRunner.infer() before activate(): use `with TrtRunner(path) as runner:`")
        return self.manifest

    @staticmethod
    def _check_in_profile(profile: Profile, name: str, shape: tuple[int, ...]) -> None:
        """Name the allowed range ourselves: TensorRT's own refusal only goes to its log."""
        ranges = profile.shape_dict().get(name)
        if ranges is None:
            return  # a static input: TensorRT checks it
        low, _, high = ranges
        if len(shape) != len(low) or not all(a <= d <= b for a, d, b in zip(low, shape, high)):
            raise ProfileError(f"input {name!r}: shape {shape} is outside profile {profile.name} "
                               f"(min {low}, max {high}); pick the bucket for this token count with "
                               f"BucketPlan.bucket_for(), or rebuild with build_engines.py --keeps/--max-refs "
                               f"covering it")

    def _max_bytes(self) -> dict[str, int]:
        """Per tensor, the most bytes any profile needs: inputs at each profile's max, outputs as TensorRT infers
        them from those inputs."""
        sizes = {name: 0 for name in self.inputs + self.outputs}
        stream = self.memory.stream_handle
        for index in range(self.engine.num_optimization_profiles):
            self._switch_profile(index, stream)
            for name in self.inputs:
                if name in self.external and name not in self.manifest.profiles[index].shape_dict():
                    continue
                # The manifest's max (static inputs are in it too, and TensorRT keeps no range for those).
                ranges = self.manifest.profiles[index].shape_dict().get(name)
                high = tuple(ranges[2]) if ranges else tuple(self.engine.get_tensor_shape(name))
                self.context.set_input_shape(name, high)
            for name in sizes:
                if name in self.external:
                    continue
                shape = tuple(self.context.get_tensor_shape(name))
                if any(d < 0 for d in shape):
                    raise RunnerError(f"output {name!r} has a data-dependent shape {shape}; not supported")
                count = int(np.prod(shape, dtype=np.int64))
                sizes[name] = max(sizes[name], count * _itemsize(self.dtypes[name]))
        self.memory.synchronize()
        return sizes


def _current(memory: Any) -> Any:
    """``memory.current()`` (its GPU as the current device) where the memory has one; a no-op otherwise."""
    current = getattr(memory, "current", None)
    return current() if current is not None else contextlib.nullcontext()
