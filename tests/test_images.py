"""Loading references of every kind, and preparing them exactly as diffusers' Flux2KleinPipeline does."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sparse_context.runtime.errors import ImageError, InputError
from sparse_context.runtime.images import (
    SAMPLES_DIR, load_image, prepare_mask, prepare_reference, prepare_reference_array, prepare_reference_with_size,
    reference_geometry, sample_images,
)

EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(sample_images()["coffee"]).convert("RGB")


# ---------------------------------------------------------------------------------------------- load_image


def test_load_image_accepts_path_pil_and_array(photo, tmp_path):
    path = tmp_path / "photo.png"
    photo.save(path)
    expected = np.asarray(photo)  # (H, W, 3)
    for source in (path, str(path), photo, expected):
        image = load_image(source)
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), expected)


def test_load_image_array_kinds():
    gray = np.array([[0, 128], [255, 7]], dtype=np.uint8)  # (2, 2)
    np.testing.assert_array_equal(np.asarray(load_image(gray))[1, 1], [7, 7, 7])
    np.testing.assert_array_equal(np.asarray(load_image(gray[:, :, None]))[0, 1], [128, 128, 128])
    sixteen = np.array([[0, 1000], [32896, 65535]], dtype=np.uint16)  # 1000 -> 4: scaled, not clipped to 255
    np.testing.assert_array_equal(np.asarray(load_image(sixteen))[:, :, 0], [[0, 4], [128, 255]])
    unit = np.full((2, 2, 3), 0.5, dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(load_image(unit))[0, 0], [128, 128, 128])
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red stays red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent becomes white
    rgba[1, 0] = (0, 0, 0, 128)  # half-transparent black becomes mid grey
    out = np.asarray(load_image(rgba))  # (2, 2, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[1, 0], [127, 127, 127])


@pytest.mark.parametrize(
    "mode, color, expected",
    [
        ("RGBA", (255, 0, 0, 0), (255, 255, 255)),
        ("LA", (0, 128), (127, 127, 127)),
        ("L", 77, (77, 77, 77)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("I;16", 65535, (255, 255, 255)),
        ("I;16", 1000, (4, 4, 4)),
        ("I", 32896, (128, 128, 128)),
        ("F", 0.5, (128, 128, 128)),
    ],
)
def test_load_image_converts_modes(mode, color, expected):
    image = load_image(Image.new(mode, (8, 8), color))
    assert image.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(image)[3, 3], expected)


def test_load_image_palette_with_transparency_is_composited_over_white():
    palette_image = Image.new("P", (8, 8), 3)
    palette_image.putpalette([0, 0, 0] * 3 + [10, 200, 30] + [0, 0, 0] * 252)
    palette_image.info["transparency"] = 3
    np.testing.assert_array_equal(np.asarray(load_image(palette_image))[0, 0], [255, 255, 255])
    del palette_image.info["transparency"]
    np.testing.assert_array_equal(np.asarray(load_image(palette_image))[0, 0], [10, 200, 30])


def test_load_image_sixteen_bit_png_file(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)  # (64, 64)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    out = np.asarray(load_image(path))[:, :, 0]  # (64, 64)
    np.testing.assert_array_equal(out, np.rint(values / 257.0).astype(np.uint8))
    assert len(np.unique(out)) == 256  # the whole 8-bit range is used, nothing saturates


def test_load_image_applies_exif_orientation(tmp_path):
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)  # (H, W, 3): left half red, right half blue
    pixels[:, :32] = (255, 0, 0)
    pixels[:, 32:] = (0, 0, 255)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    image = np.asarray(load_image(path))
    assert image.shape == (64, 32, 3)  # portrait after rotation
    assert image[4, 16, 0] > 200 and image[4, 16, 2] < 50  # the red left half is now on top
    assert image[60, 16, 2] > 200 and image[60, 16, 0] < 50


def test_load_image_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"got '.*nope\.png'; allowed: an existing image file.*--ref"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="a file, not a folder"):
        load_image(tmp_path)


def test_load_image_unreadable_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image")
    with pytest.raises(ImageError, match=r"notes\.png'; allowed: a file Pillow can read.*--ref"):
        load_image(path)


@pytest.mark.parametrize("suffix", ["jpg", "png"])
def test_load_image_truncated_file(photo, tmp_path, suffix):
    path = tmp_path / f"cut.{suffix}"
    photo.save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=rf"cut\.{suffix}'; allowed: a complete image; decoding failed: .*truncated"):
        load_image(path)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((8, 8, 2), np.uint8), r"image array shape: got \(8, 8, 2\); allowed: \(H, W\), \(H, W, 1\)"),
        (np.zeros((8,), np.uint8), r"image array shape: got \(8,\)"),
        (np.zeros((0, 8, 3), np.uint8), r"image array shape: got \(0, 8, 3\)"),
        (np.zeros((8, 8, 3), np.int32), r"image array dtype: got 'int32'; allowed: uint8, uint16, or float"),
        (np.full((8, 8, 3), 2.0), r"float image values: got 'range \[2.0, 2.0\]'; allowed: values in \[0, 1\]"),
        (np.full((8, 8, 3), np.nan), r"float image values: got 'range \[nan, nan\]'"),
    ],
)
def test_load_image_bad_arrays(array, message):
    with pytest.raises(ImageError, match=message):
        load_image(array)


def test_load_image_bad_type():
    with pytest.raises(ImageError, match=r"reference image: got 'list'; allowed: a file path, a PIL image or a numpy"):
        load_image([[0, 0], [0, 0]])


# ---------------------------------------------------------------------------------------------- prepare_reference


@pytest.mark.parametrize(
    "size, prepared",
    [
        ((600, 400), (592, 400)),  # small: floor to 16, centre-crop
        ((1037, 1029), (1024, 1008)),  # just over 1024^2: LANCZOS down, then floor
        ((1500, 1000), (1248, 832)),  # large landscape
        ((1000, 1500), (832, 1248)),  # large portrait
        ((333, 517), (320, 512)),  # small portrait, odd sides
        ((64, 500), (64, 496)),  # tall and narrow, aspect < 8
    ],
)
def test_prepare_reference_sizes(photo, size, prepared):
    image = prepare_reference(photo.resize(size, Image.Resampling.BICUBIC))
    assert image.size == prepared
    assert image.mode == "RGB"


@pytest.mark.parametrize("size", [(600, 400), (1037, 1029), (1500, 1000), (1000, 1500), (333, 517), (2048, 1024)])
@pytest.mark.parametrize("prepare", ["pil", "array"])
def test_prepare_reference_matches_diffusers(photo, size, prepare):
    pytest.importorskip("diffusers", reason="the equivalence check runs diffusers' own Flux2ImageProcessor")
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    reference = photo.resize(size, Image.Resampling.BICUBIC)
    # The steps of Flux2KleinPipeline.__call__, "# 4. process images", with vae_scale_factor = 8.
    processor = Flux2ImageProcessor(vae_scale_factor=8 * 2)
    processor.check_image_input(reference)
    image, (width, height) = reference, reference.size
    if width * height > 1024 * 1024:
        image = processor._resize_to_target_area(image, 1024 * 1024)
        width, height = image.size
    width, height = width // 16 * 16, height // 16 * 16
    tensor = processor.preprocess(image, height=height, width=width, resize_mode="crop")  # (1, 3, H, W) in [-1, 1]
    theirs = ((tensor[0].permute(1, 2, 0).numpy() + 1.0) / 2.0 * 255.0).round()  # (H, W, 3)

    if prepare == "pil":
        ours = np.asarray(prepare_reference(reference))  # (H, W, 3) uint8
    else:
        ours = prepare_reference_array(np.asarray(reference))  # (H, W, 3) uint8, no PIL image handed in
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs.astype(np.uint8))


SIZES_BY_PATH = [
    (1024, 1024),  # already prepared: a view
    (1280, 720),  # within the area, whole tokens: a view
    (600, 400),  # crop only: a view
    (1037, 1029),  # just over 1024^2: LANCZOS, then a crop
    (1920, 1080),  # LANCZOS, then a crop
]


@pytest.mark.parametrize("size", SIZES_BY_PATH)
def test_prepare_reference_array_equals_the_pil_preparation(photo, size, tmp_path):
    reference = photo.resize(size, Image.Resampling.BICUBIC)
    expected = np.asarray(prepare_reference(reference))  # (h, w, 3)
    path = tmp_path / "reference.png"
    reference.save(path)
    for source in (reference, np.asarray(reference), path):
        pixels, given_size = prepare_reference_with_size(source)
        assert given_size == size
        assert pixels.dtype == np.uint8 and not pixels.flags.writeable
        np.testing.assert_array_equal(pixels, expected)
        np.testing.assert_array_equal(prepare_reference_array(source), expected)


@pytest.mark.parametrize("size, copies", [((1024, 1024), False), ((1280, 720), False), ((600, 400), False),
                                          ((1037, 1029), True)])
def test_prepare_reference_array_views_the_callers_array_unless_it_resizes(photo, size, copies):
    array = np.array(photo.resize(size, Image.Resampling.BICUBIC))  # (H, W, 3), writable
    pixels = prepare_reference_array(array)
    assert np.shares_memory(pixels, array) is not copies
    assert array.flags.writeable  # the view is read-only, the caller's array is not touched
    with pytest.raises(ValueError, match="read-only"):
        pixels[0, 0, 0] = 1


def test_prepare_reference_array_of_other_kinds_matches_load_image():
    rng = np.random.default_rng(0)
    for array in (rng.integers(0, 256, (300, 500, 4), dtype=np.uint8), rng.random((333, 517, 3)),
                  rng.integers(0, 65536, (200, 300), dtype=np.uint16), np.asfortranarray(rng.integers(
                      0, 256, (96, 160, 3), dtype=np.uint8))):
        np.testing.assert_array_equal(prepare_reference_array(array), np.asarray(prepare_reference(array)))


def test_prepare_reference_array_errors():
    with pytest.raises(ImageError, match=r"reference image size: got '40x100 px'.*--ref"):
        prepare_reference_array(np.zeros((100, 40, 3), np.uint8))
    with pytest.raises(ImageError, match=r"image array shape: got \(4, 4, 2\).*--ref"):
        prepare_reference_array(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ImageError, match=r"reference image: got 'list'.*--ref"):
        prepare_reference_array([[0]])


@pytest.mark.parametrize(
    "size, message",
    [
        ((10, 100), r"got '10x100 px'.*smaller than one 16x16 px token.*--ref"),
        ((40, 100), r"reference image size: got '40x100 px'; allowed: both sides at least 64 px.*--ref"),
        ((64, 600), r"reference aspect ratio: got '64x600 px \(ratio 9.38:1\)'; allowed: at most 8:1.*--ref"),
    ],
)
def test_prepare_reference_rejects_sizes_diffusers_rejects(size, message):
    with pytest.raises(ImageError, match=message):
        prepare_reference(Image.new("RGB", size))


@pytest.mark.parametrize("size", [(600, 400), (1037, 1029), (1000, 1500)])
def test_prepare_mask_follows_the_image_geometry(size):
    width, height = size
    (resized_width, resized_height), (left, top, right, bottom) = reference_geometry(width, height)
    mask = np.zeros((height, width), np.float32)  # (H, W): the right half of the image as given
    mask[:, width // 2:] = 1.0
    prepared = prepare_mask(mask)
    assert prepared.shape[::-1] == prepare_reference(Image.new("RGB", size)).size == (right - left, bottom - top)
    split = resized_width // 2 - left  # where the half-way column lands after resize and crop
    assert prepared[:, : split - 1].max() < 1e-3 and prepared[:, split + 1:].min() > 1 - 1e-3


def test_prepare_reference_rejects_bad_multiple():
    with pytest.raises(InputError, match="multiple_of: got 8; allowed: a positive multiple of 16"):
        prepare_reference(Image.new("RGB", (128, 128)), multiple_of=8)


# ---------------------------------------------------------------------------------------------- samples


def test_sample_images_are_small_real_photos_with_licences():
    samples = sample_images()
    assert len(samples) >= 3
    licence = (SAMPLES_DIR / "LICENSE.md").read_text()
    for name, path in samples.items():
        assert path.stat().st_size <= 125_000
        assert f"`{path.name}`" in licence
        with Image.open(path) as image:
            assert max(image.size) <= 768
            assert min(image.size) >= 256
        assert np.asarray(load_image(path)).std() > 20  # a photo, not a flat placeholder
