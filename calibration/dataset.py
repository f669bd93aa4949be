"""Calibration sets (prompts + reference images) and the deterministic list of samples drawn from one.

A set is a folder with ``calibration.json`` (``{"samples": [{"prompt": ..., "references": [paths]}]}``, paths
relative to the folder), or a folder of images with ``prompts.txt`` (one prompt a line; each prompt is paired
with a rotating subset of the images), or the bundled sample photos with :data:`BUNDLED_PROMPTS`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from sparse_context.calibration.errors import CalibrationConfigError
from sparse_context.runtime.errors import bad_value

SET_MANIFEST = "calibration.json"
PROMPTS_FILE = "prompts.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
FLAG_CALIBRATION = "--calibration"
BUNDLED_PROMPTS = (
    "the cat from the first image wearing an astronaut suit, drinking coffee",
    "a rocket launching over a city at night, in the style of the second image",
    "a cup of coffee on a wooden table next to the cat",
    "an astronaut portrait in warm evening light",
    "the object from the first image on a snowy mountain",
    "a watercolor painting combining both references",
    "a close-up photo with shallow depth of field",
    "a product shot on a plain white background",
)


@dataclass(frozen=True)
class CalibrationItem:
    prompt: str
    references: tuple[Path, ...]


@dataclass(frozen=True)
class CalibrationSet:
    items: tuple[CalibrationItem, ...]
    source: str  # "bundled" or the folder

    def digest(self) -> str:
        """sha256 over prompts and reference bytes: the capture cache key changes when any of them does."""
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(item.prompt.encode() + b"\0")
            for path in item.references:
                digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
        return digest.hexdigest()


def _rotating_items(prompts: Sequence[str], images: Sequence[Path], max_refs: int) -> tuple[CalibrationItem, ...]:
    """Prompt i with 1..max_refs images starting at image i: every image and reference count appears."""
    items = []
    for index, prompt in enumerate(prompts):
        count = 1 + index % min(max_refs, len(images))
        items.append(CalibrationItem(prompt, tuple(images[(index + k) % len(images)] for k in range(count))))
    return tuple(items)


def bundled_set(max_refs: int = 3) -> CalibrationSet:
    from sparse_context.runtime.images import sample_images

    images = [Path(p) for p in sample_images().values()]
    return CalibrationSet(_rotating_items(BUNDLED_PROMPTS, images, max_refs), "bundled")


def load_set(folder: str | Path, max_refs: int = 3) -> CalibrationSet:
    """The calibration set in ``folder`` (see the module doc); CalibrationConfigError naming the flag if none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationConfigError(bad_value("calibration folder", str(folder), "an existing folder",
                                               FLAG_CALIBRATION))
    if (folder / SET_MANIFEST).is_file():
        return _from_manifest(folder)
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    prompts_file = folder / PROMPTS_FILE
    if not images or not prompts_file.is_file():
        raise CalibrationConfigError(bad_value(
            "calibration folder", str(folder), f"a folder with {SET_MANIFEST}, or images with {PROMPTS_FILE}, or a "
            "capture written by build_engines.py", FLAG_CALIBRATION))
    prompts = [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise CalibrationConfigError(bad_value(str(prompts_file), "no prompts", "one prompt a line",
                                               FLAG_CALIBRATION))
    return CalibrationSet(_rotating_items(prompts, images, max_refs), str(folder.resolve()))


def _from_manifest(folder: Path) -> CalibrationSet:
    path = folder / SET_MANIFEST
    try:
        samples = json.loads(path.read_text())["samples"]
        items = tuple(CalibrationItem(str(s["prompt"]), tuple(folder / r for r in s["references"])) for s in samples)
    except (ValueError, KeyError, TypeError) as error:
        raise CalibrationConfigError(bad_value(str(path), f"unreadable ({error})", '{"samples": [{"prompt": '
                                               '"...", "references": ["a.jpg"]}]}', FLAG_CALIBRATION)) from None
    missing = [str(p) for item in items for p in item.references if not p.is_file()]
    if not items or missing:
        raise CalibrationConfigError(bad_value(str(path), f"missing images {missing}" if missing else "no samples",
                                               "samples whose reference images exist", FLAG_CALIBRATION))
    return CalibrationSet(items, str(folder.resolve()))


@dataclass(frozen=True)
class SampleSpec:
    """One generation to record: its item, keep fraction, strategy, target size (w, h) and seed."""

    index: int
    prompt: str
    references: tuple[str, ...]
    keep_fraction: float
    strategy: str
    target_size: tuple[int, int]
    seed: int

    def to_json(self) -> dict:
        return {"index": self.index, "prompt": self.prompt, "references": list(self.references),
                "keep_fraction": self.keep_fraction, "strategy": self.strategy,
                "target_size": list(self.target_size), "seed": self.seed}

    @classmethod
    def from_json(cls, data: dict) -> "SampleSpec":
        return cls(int(data["index"]), str(data["prompt"]), tuple(data["references"]), float(data["keep_fraction"]),
                   str(data["strategy"]), tuple(data["target_size"]), int(data["seed"]))


def draw_samples(calibration_set: CalibrationSet, count: int, keep_fractions: Sequence[float],
                 strategies: Sequence[str], target_sizes: Sequence[tuple[int, int]], max_refs: int,
                 seed: int) -> list[SampleSpec]:
    """``count`` samples cycling items, keep fractions (fastest), strategies and target sizes; seed + index."""
    keeps = sorted(float(k) for k in keep_fractions)
    samples = []
    for index in range(int(count)):
        item = calibration_set.items[index % len(calibration_set.items)]
        samples.append(SampleSpec(
            index=index, prompt=item.prompt, references=tuple(str(p) for p in item.references[:max_refs]),
            keep_fraction=keeps[index % len(keeps)], strategy=strategies[(index // len(keeps)) % len(strategies)],
            target_size=tuple(target_sizes[index % len(target_sizes)]), seed=int(seed) + index))
    return samples
