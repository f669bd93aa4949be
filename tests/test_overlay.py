"""Selection overlays: dimmed dropped tokens, outlined kept regions, atomic PNG writes, labelled sheets."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sparse_context.runtime.benchmark_selection import benchmark_selection
from sparse_context.runtime.errors import InputError
from sparse_context.runtime.images import sample_images
from sparse_context.runtime.overlay import (
    DROPPED_BRIGHTNESS, OUTLINE_RGB, draw_selection, save_png, selection_grid_png,
)
from sparse_context.runtime.selection import Strategy, select_references

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_draw_selection_keeps_chosen_tokens_and_dims_the_rest():
    image = np.full((64, 96, 3), 200, np.uint8)  # (H, W, 3) 4x6 tokens
    out = draw_selection(image, np.array([0, 7]), (4, 6))  # tokens (0, 0) and (1, 1)
    assert out.shape == image.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[8, 8], [200, 200, 200])  # inside a kept token: untouched
    np.testing.assert_array_equal(out[24, 24], [200, 200, 200])
    np.testing.assert_array_equal(out[0, 0], OUTLINE_RGB)  # its border: outlined
    assert abs(int(out[40, 40, 0]) - DROPPED_BRIGHTNESS * 200) <= 1  # dropped: dimmed
    assert not np.shares_memory(out, image)


def test_draw_selection_empty_and_full():
    image = np.full((32, 32, 3), 100, np.uint8)
    assert draw_selection(image, np.array([], np.int64), (2, 2)).max() < 100
    full = draw_selection(image, np.arange(4), (2, 2))
    np.testing.assert_array_equal(full[8:24, 8:24], image[8:24, 8:24])


def test_draw_selection_errors():
    image = np.zeros((64, 96, 3), np.uint8)
    with pytest.raises(InputError, match=r"overlay image size: got '96x64 px'; allowed: 96x48 px \(3x6 tokens"):
        draw_selection(image, np.array([0]), (3, 6))
    with pytest.raises(InputError, match=r"token index range: got \(0, 24\); allowed: 0 to 23 for a 4x6 grid"):
        draw_selection(image, np.array([0, 24]), (4, 6))
    with pytest.raises(InputError, match=r"image to draw on: got 'ndarray \(64, 96\) uint8'; allowed: an \(H, W, 3\)"):
        draw_selection(image[:, :, 0], np.array([0]), (4, 6))


def test_save_png_is_atomic_and_readable(tmp_path):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :, 0] = 255  # red, to check the channel order survives OpenCV's BGR
    path = save_png(tmp_path / "nested" / "red.png", rgb)
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    with Image.open(path) as image:
        assert image.size == (30, 20)
        np.testing.assert_array_equal(np.asarray(image.convert("RGB"))[5, 5], [255, 0, 0])
    assert [p.name for p in path.parent.iterdir()] == ["red.png"]  # no temporary left behind
    save_png(path, np.zeros((4, 4, 3), np.uint8))  # overwriting replaces the file whole
    with Image.open(path) as image:
        assert image.size == (4, 4)
    with pytest.raises(InputError, match=r"image to save: got 'ndarray \(4, 4\) float64'"):
        save_png(tmp_path / "bad.png", np.zeros((4, 4)))


def test_overlays_of_sample_photos_and_sheet(tmp_path):
    samples = sample_images()
    rows, labels = [], []
    for name in ("chelsea", "rocket"):
        row, row_labels = [], []
        for strategy in (Strategy.UNIFORM, Strategy.EDGE, Strategy.SALIENCY):
            (selection,) = select_references([samples[name]], strategy=strategy, keep_fraction=0.1)
            overlay = draw_selection(np.asarray(selection.image), selection.indices, selection.grid)
            path = save_png(tmp_path / f"{name}_{strategy.value}.png", overlay)
            with Image.open(path) as image:
                assert image.format == "PNG"
                assert image.size == selection.image.size
            row.append(overlay)
            row_labels.append(f"{name} {strategy.value}")
        rows.append(row)
        labels.append(row_labels)
    sheet = selection_grid_png(tmp_path / "sheet.png", rows, labels, tile_height=100)
    with Image.open(tmp_path / "sheet.png") as image:
        assert image.size == (sheet.shape[1], sheet.shape[0])
    assert sheet.shape[0] == 2 * (100 + 28) + 8  # two rows of label bar + tile, one gap
    with pytest.raises(InputError, match=r"label layout: got \[1\]; allowed: one label per image: \[3\]"):
        selection_grid_png(tmp_path / "bad.png", rows[:1], [["only one"]])


def test_benchmark_selection_returns_timings():
    result = benchmark_selection(strategies=("uniform", "edge"), size=256, repeats=2)
    assert result["size"] == 256 and result["threads"] == 1 and result["tokens_kept"] == 26
    assert set(result["ms_per_reference"]) == {"uniform", "edge"}
    assert all(ms > 0 for ms in result["ms_per_reference"].values())
