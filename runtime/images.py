"""Reference images: load anything a user may hand us as 8-bit RGB, then shape it exactly as FLUX.2 sees it.

Token selection scores the image the VAE encodes, so ``prepare_reference`` reproduces diffusers 0.42
``Flux2KleinPipeline.__call__`` step "# 4. process images" pixel for pixel: LANCZOS down to 1024*1024 px of area,
floor both sides to a multiple of 16, centre-crop to that size.

``prepare_reference`` hands back a PIL image (what the VAE path encodes); ``prepare_reference_array`` the same
pixels as a read-only numpy array, without a PIL round trip where none is needed: an 8-bit RGB array already at
its prepared size comes back as a view, a crop is a view, and only a resize goes through Pillow (once).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sparse_context.runtime.errors import ImageError, InputError, bad_value
from sparse_context.runtime.tokens import MAX_REFERENCE_AREA, TOKEN_PIXELS

# diffusers Flux2ImageProcessor.check_image_input refuses anything outside these limits.
MIN_SIDE_PIXELS = 64
MAX_ASPECT_RATIO = 8
SAMPLES_DIR = Path(__file__).resolve().parent / "samples"

ALLOWED_SOURCES = "a file path, a PIL image or a numpy array"
ALLOWED_ARRAY_SHAPES = "(H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
ALLOWED_ARRAY_DTYPES = "uint8, uint16, or float with values in [0, 1]"
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


EXIF_ORIENTATION = 0x0112


def load_image(source: str | os.PathLike | Image.Image | np.ndarray, what: str = "reference image",
               flag: str = "--ref") -> Image.Image:
    """Return ``source`` as an 8-bit RGB PIL image, upright per its EXIF orientation.

    Transparent pixels are composited over white; 16-bit and float data are scaled (not clipped) to 8 bits.
    ``what`` and ``flag`` name the image in errors (a mask is not a reference).
    """
    if isinstance(source, np.ndarray):
        return Image.fromarray(_rgb8_from_array(source), mode="RGB")
    if isinstance(source, (str, os.PathLike)):
        image = _open_fully(Path(source), what, flag)
    elif isinstance(source, Image.Image):
        image = source
    else:
        raise ImageError(bad_value(what, type(source).__name__, ALLOWED_SOURCES, flag))
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)  # a phone portrait is stored landscape plus an orientation tag
    return _rgb8_from_pil(image)  # an upright RGB image comes back as is: no copy on the runtime's path


def prepare_reference(
    image: str | os.PathLike | Image.Image | np.ndarray,
    max_area: int = MAX_REFERENCE_AREA,
    multiple_of: int = TOKEN_PIXELS,
) -> Image.Image:
    """The reference exactly as diffusers' Flux2KleinPipeline hands it to the VAE (before [-1, 1] scaling).

    Its width and height are multiples of ``multiple_of``, so it splits into whole 16-px tokens.
    """
    image = load_image(image)
    resized_size, crop_box = reference_geometry(*image.size, max_area=max_area, multiple_of=multiple_of)
    if resized_size != image.size:
        image = image.resize(resized_size, Image.Resampling.LANCZOS)
    if crop_box == (0, 0, *image.size):
        return image  # already whole tokens: no copy
    return image.crop(crop_box)


def prepare_reference_array(
    image: str | os.PathLike | Image.Image | np.ndarray,
    max_area: int = MAX_REFERENCE_AREA,
    multiple_of: int = TOKEN_PIXELS,
) -> np.ndarray:
    """``prepare_reference`` as a read-only (h, w, 3) uint8 array, pixel for pixel the same."""
    return prepare_reference_with_size(image, max_area, multiple_of)[0]


def prepare_reference_with_size(
    image: str | os.PathLike | Image.Image | np.ndarray,
    max_area: int = MAX_REFERENCE_AREA,
    multiple_of: int = TOKEN_PIXELS,
) -> tuple[np.ndarray, tuple[int, int]]:
    """``(prepare_reference_array(image), (width, height) of the image as given)``.

    The size as given is what a mask drawn on the original maps from (``prepare_mask``); returning it here
    saves decoding a file twice.
    """
    if isinstance(image, np.ndarray):
        pixels, picture = _rgb8_from_array(image), None  # (H, W, 3), a view of an 8-bit RGB array
        size = (pixels.shape[1], pixels.shape[0])
    else:
        pixels, picture = None, load_image(image)
        size = picture.size
    resized_size, (left, top, right, bottom) = reference_geometry(*size, max_area, multiple_of)
    if resized_size != size:
        # Pillow's LANCZOS is what diffusers runs; another resampler would change the prepared pixels.
        picture = picture if picture is not None else Image.fromarray(pixels)
        pixels = np.asarray(picture.resize(resized_size, Image.Resampling.LANCZOS))  # (h, w, 3)
    elif pixels is None:
        pixels = np.asarray(picture)  # (H, W, 3): the one copy out of Pillow
    prepared = pixels[top:bottom, left:right]  # (h', w', 3): a crop is a view, never a copy
    prepared.flags.writeable = False  # may share memory with the caller's array
    return prepared, size


def reference_geometry(
    width: int, height: int, max_area: int = MAX_REFERENCE_AREA, multiple_of: int = TOKEN_PIXELS
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """``(resized (width, height), crop box (left, top, right, bottom))`` that ``prepare_reference`` applies."""
    if not _is_int(multiple_of) or multiple_of <= 0 or multiple_of % TOKEN_PIXELS:
        allowed = f"a positive multiple of {TOKEN_PIXELS} (the token size)"
        raise InputError(bad_value("multiple_of", multiple_of, allowed))
    if not _is_int(max_area) or max_area < MIN_SIDE_PIXELS**2:
        raise InputError(bad_value("max_area", max_area, f"an integer of at least {MIN_SIDE_PIXELS**2} px"))
    check_reference_size(width, height)
    # 1. Flux2ImageProcessor._resize_to_target_area: only when the area exceeds the limit; int() truncates.
    if width * height > max_area:
        scale = math.sqrt(max_area / (width * height))
        width, height = int(width * scale), int(height * scale)

    # 2. The pipeline floors both sides to vae_scale_factor * 2 = 16 px; preprocess() floors again (a no-op).
    crop_width = width // multiple_of * multiple_of
    crop_height = height // multiple_of * multiple_of

    # 3. preprocess(resize_mode="crop") -> Flux2ImageProcessor._resize_and_crop: a centre crop, no resampling.
    left = (width - crop_width) // 2
    top = (height - crop_height) // 2
    return (width, height), (left, top, left + crop_width, top + crop_height)


def prepare_mask(
    mask: np.ndarray, max_area: int = MAX_REFERENCE_AREA, multiple_of: int = TOKEN_PIXELS
) -> np.ndarray:
    """A (H, W) mask drawn on the original reference, resized and cropped the way ``prepare_reference`` does it.

    Area averaging instead of LANCZOS: a mask weight must not ring below zero at a sharp border.
    """
    values = np.asarray(mask, dtype=np.float32)  # (H, W)
    resized_size, (left, top, right, bottom) = reference_geometry(values.shape[1], values.shape[0], max_area,
                                                                  multiple_of)
    if resized_size != (values.shape[1], values.shape[0]):
        values = cv2.resize(values, resized_size, interpolation=cv2.INTER_AREA)  # (h, w)
    return values[top:bottom, left:right]  # (h', w'), the prepared reference's pixel grid


def check_reference_size(width: int, height: int) -> None:
    """Raise ImageError for the sizes diffusers' ``check_image_input`` refuses (and for sub-token images)."""
    given = f"{width}x{height} px"
    if min(width, height) < TOKEN_PIXELS:
        raise ImageError(
            bad_value("reference image size", given, f"both sides at least {MIN_SIDE_PIXELS} px; "
                      f"this is smaller than one {TOKEN_PIXELS}x{TOKEN_PIXELS} px token", "--ref")
        )
    if min(width, height) < MIN_SIDE_PIXELS:
        raise ImageError(bad_value("reference image size", given, f"both sides at least {MIN_SIDE_PIXELS} px", "--ref"))
    aspect = max(width / height, height / width)
    if aspect > MAX_ASPECT_RATIO:
        given = f"{given} (ratio {aspect:.2f}:1)"
        raise ImageError(bad_value("reference aspect ratio", given, f"at most {MAX_ASPECT_RATIO}:1", "--ref"))


def sample_images() -> dict[str, Path]:
    """The bundled sample photos by name (``astronaut``, ``chelsea``, ...); sources in samples/LICENSE.md."""
    return {path.stem: path for path in sorted(SAMPLES_DIR.glob("*.jpg"))}


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _open_fully(path: Path, what: str = "reference image", flag: str = "--ref") -> Image.Image:
    if not path.exists():
        raise ImageError(bad_value(f"{what} file", str(path), "an existing image file", flag))
    if not path.is_file():
        raise ImageError(bad_value(f"{what} file", str(path), "a file, not a folder", flag))
    try:
        with Image.open(path) as image:
            image.load()  # Image.open reads only the header; a cut-off file must fail here, not inside the VAE
    except UnidentifiedImageError:
        allowed = "a file Pillow can read (PNG, JPEG, WebP, TIFF, ...)"
        raise ImageError(bad_value(f"{what} file", str(path), allowed, flag)) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        allowed = f"a complete image; decoding failed: {error}"
        raise ImageError(bad_value(f"{what} file", str(path), allowed, flag)) from None
    return image


def _rgb8_from_pil(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in SIXTEEN_BIT_MODES:
        # 16-bit PNG/TIFF greyscale opens as I;16 (or I, as int32 holding 0..65535).
        values = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)  # (H, W)
        return Image.fromarray(_rgb8_from_array(values), mode="RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)  # (H, W)
        if values.size and np.nanmax(values) > 1.0:
            values = values / 255.0  # Pillow's own F -> L convention: values are 0..255
        return Image.fromarray(_rgb8_from_array(values), mode="RGB")
    try:
        if mode in ALPHA_MODES or "transparency" in image.info:
            rgba = np.asarray(image.convert("RGBA"))  # (H, W, 4)
            return Image.fromarray(_rgb8_from_array(rgba), mode="RGB")
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except ValueError:  # e.g. "La" (premultiplied alpha), which Pillow cannot convert
        allowed = "a mode Pillow can convert to RGB (L, LA, P, RGBA, CMYK, I;16, ...)"
        raise ImageError(bad_value("image mode", mode, allowed, "--ref")) from None


def _rgb8_from_array(array: np.ndarray) -> np.ndarray:
    """(H, W[, C]) uint8/uint16/float array -> (H, W, 3) uint8; alpha is composited over white."""
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W, 1)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise ImageError(bad_value("image array shape", array.shape, ALLOWED_ARRAY_SHAPES, "--ref"))
    if array.dtype == np.uint8 and array.shape[2] != 4:
        return np.ascontiguousarray(np.broadcast_to(array, (*array.shape[:2], 3)))  # (H, W, 3), no rounding
    if array.dtype == np.uint8:
        unit = array.astype(np.float32) / 255.0
    elif array.dtype == np.uint16:
        unit = array.astype(np.float32) / 65535.0  # full 16-bit range onto 0..1: scaled, not clipped
    elif np.issubdtype(array.dtype, np.floating):
        unit = array.astype(np.float32)
        low, high = float(np.min(unit)), float(np.max(unit))  # NaN propagates and fails the check below
        if not (0.0 <= low and high <= 1.0):
            raise ImageError(bad_value("float image values", f"range [{low}, {high}]", "values in [0, 1]", "--ref"))
    else:
        raise ImageError(bad_value("image array dtype", str(array.dtype), ALLOWED_ARRAY_DTYPES, "--ref"))

    if unit.shape[2] == 4:
        alpha = unit[:, :, 3:4]  # (H, W, 1)
        unit = unit[:, :, :3] * alpha + (1.0 - alpha)  # over white: transparent references read as blank paper
    if unit.shape[2] == 1:
        unit = np.repeat(unit, 3, axis=2)  # (H, W, 3)
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)  # (H, W, 3)
