"""Image files in and out: Pillow does the decoding; this module makes every input plain sRGB.

How modes become RGB (documented in the README):
- EXIF orientation is applied first; an animated image contributes its first frame.
- L, 1, P, CMYK, YCbCr, LAB, HSV: Pillow's conversion to RGB.
- Alpha (RGBA, LA, PA; P, L or RGB with a transparency key): composited over white, since a
  transparent pixel has no colour to match.
- 16-bit and float greys (I;16*, I, F): scaled to 8 bits: 16-bit from 0-65535; a float image
  within 0-1 from 0-1; I or F within 0-255 kept; otherwise from the image's own min-max.
"""

from __future__ import annotations

import functools
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import SizeEdge
from .errors import EngineError, EngineWarning
from .files import write_atomic

# Pillow's own bomb guard refuses above this (it warns from half of it); so do we, from our own check.
MAX_PIXELS = 178_956_970


class ImageError(EngineError):
    """An image that cannot be read, written or used; the message names the file."""


class ImageWarning(EngineWarning):
    """An image read despite something wrong in it (damaged metadata)."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        a = np.asarray(im, dtype=np.float64) / 65535.0
        return Image.fromarray(np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode in ("I", "F"):
        return Image.fromarray(_scaled_to_8_bits(np.asarray(im, dtype=np.float64), im.mode), "L").convert("RGB")
    if im.mode in ("P", "L", "RGB") and "transparency" in im.info:  # a palette index or colour key
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _scaled_to_8_bits(a: np.ndarray, mode: str) -> np.ndarray:
    """An I or F image's values as 8 bits. A float image within 0-1 is taken as 0-1 (the usual
    convention for float images, and a float mask's weights stay what they are); one within
    0-255 (or constant), as 8-bit values, clipped; anything else is stretched from its own
    min-max. nan and -inf read as the image's darkest finite value, +inf as its brightest; an
    image with no finite value is an error."""
    finite = np.isfinite(a)
    if not finite.any():
        raise ImageError("holds no finite pixel values (every value is nan or inf)")
    lo, hi = float(a[finite].min()), float(a[finite].max())
    a = np.nan_to_num(a, nan=lo, posinf=hi, neginf=lo)
    if mode == "F" and lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0
    elif lo >= 0 and hi <= 255 or lo == hi:  # a constant outside 0-255 has no range: clipped
        lo, hi = 0.0, 255.0
    a = (a - lo) / (hi - lo)
    return np.clip(a * 255.0 + 0.5, 0, 255).astype(np.uint8)


def as_rgb(im: Image.Image, what: str) -> Image.Image:
    """A Pillow image handed to the Python API made RGB as `load_image` makes a file's modes (a
    float image in 0-1 was black, a 16-bit one white, a transparent one black). Its pixels are
    taken as they stand: EXIF orientation is `load_image`'s to apply, since an image turned in
    memory keeps its tag. A plain RGB image is returned as it is. One that cannot be read
    (closed, truncated) is an ImageError naming `what`."""
    try:
        im.load()
        if im.mode == "RGB" and "transparency" not in im.info:
            return im
        return _to_rgb(im)
    except ImageError as e:
        raise ImageError(f"`{what}`: {e}", params=(what,)) from None
    except Exception as e:  # noqa: BLE001 - Pillow's closed image raises ValueError or AssertionError
        raise ImageError(f"`{what}`: cannot read the image ({str(e) or type(e).__name__})", params=(what,)) from None


def load_image(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open an image file as an upright RGB Pillow image (first frame of an animation)."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path}")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image")
    return _decode(path, path, max_pixels)


def load_named(path: str | Path, param: str) -> Image.Image:
    """`load_image` for a file an option names (`init`): its errors name the option."""
    try:
        return load_image(path)
    except ImageError as e:
        raise ImageError(f"`{param}`: {e}", params=(param,)) from None


def decode_image(data: bytes, name: str | Path, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """`load_image` for a file's bytes read elsewhere (a batch worker on another machine);
    `name` is the file it came from, for messages."""
    return _decode(io.BytesIO(data), Path(name), max_pixels)


def _decode(source: Path | io.BytesIO, path: Path, max_pixels: int) -> Image.Image:
    """The decoded image. What Pillow warns of while reading (damaged EXIF data, skipped tags, a
    malformed file it could still read) becomes one ImageWarning naming the file, not its own
    lines with Pillow's source."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # Pillow warns from half our limit (its MAX_IMAGE_PIXELS) and refuses above it; the
        # limit is ours, checked in `_read`, so its warning is no refusal (it halved the limit).
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = _read(source, path, max_pixels)
    if caught:
        first = " ".join(str(caught[0].message).split())
        more = f" and {len(caught) - 1} more" if len(caught) > 1 else ""
        warnings.warn(f"{path}: read despite a problem ({first}{more})", ImageWarning, stacklevel=3)
    return im


def _read(source: Path | io.BytesIO, path: Path, max_pixels: int) -> Image.Image:
    try:
        with Image.open(source) as im:
            if im.width * im.height > max_pixels:
                raise ImageError(f"{path}: {im.width}x{im.height} is over the {max_pixels:,}-pixel limit (a decompression bomb?)")
            im.seek(0)
            im = ImageOps.exif_transpose(im) or im
            im.load()
            try:
                return _to_rgb(im)
            except ImageError as e:
                raise ImageError(f"{path}: {e}") from None
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or damaged data
        raise ImageError(f"{path}: damaged or unreadable image ({e})") from None


def output_shape(width: int, height: int, size: int, edge: SizeEdge = SizeEdge.LONGEST) -> tuple[int, int]:
    """(H, W) with `size` on the chosen edge and the other keeping the aspect ratio."""
    if edge == SizeEdge.HEIGHT or (edge == SizeEdge.LONGEST and height >= width):
        return size, max(1, round(width * size / height))
    return max(1, round(height * size / width)), size


def resize(im: Image.Image, hw: tuple[int, int]) -> Image.Image:
    """Resize to (H, W) with Lanczos (antialiased when shrinking)."""
    h, w = hw
    return im if im.size == (w, h) else im.resize((w, h), Image.Resampling.LANCZOS)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB Pillow image -> (1, 3, H, W) float32 in [0, 1]."""
    a = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(a.copy()).permute(2, 0, 1).unsqueeze(0)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) in [0, 1] -> RGB Pillow image (values clipped). Anything else
    (a batch of several, another channel count, nan, integers in 0-255) is an ImageError: it was
    written as its first image, as black, or clipped to white without a word."""
    if not isinstance(image, torch.Tensor):
        raise ImageError(f"expected a PIL image or a (1, 3, H, W) tensor in [0, 1], got {type(image).__name__}")
    shape = tuple(image.shape)
    if not (len(shape) == 3 and shape[0] == 3 or len(shape) == 4 and shape[:2] == (1, 3)):
        raise ImageError(f"expected one image, (1, 3, H, W) or (3, H, W), got a tensor of shape {shape}")
    if not image.is_floating_point():
        raise ImageError(f"expected a float tensor in [0, 1], got {image.dtype} (divide 0-255 values by 255)")
    t = image.detach().float().cpu()
    if not bool(torch.isfinite(t).all()):
        raise ImageError("the image holds nan or inf values; nothing written")
    if t.dim() == 4:
        t = t[0]
    a = (t.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(a, "RGB")


COMMON_EXTENSIONS = ".png, .jpg, .webp, .tif, .bmp"


@functools.cache
def writes_rgb(fmt: str) -> bool:
    """Whether Pillow can write an RGB image as `fmt`: some formats it registers for saving take
    only other modes (XBM, MSP, BLP, PALM) or need a plugin (WMF, GRIB, HDF5), found only by trying."""
    try:
        Image.new("RGB", (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception:  # noqa: BLE001 - each plugin fails in its own way (OSError, ValueError, KeyError)
        return False
    return True


def output_format(path: str | Path) -> str:
    """Pillow's format name for a file name's extension, or ImageError naming the choices: an
    unknown extension, or one whose format cannot hold an RGB image (found before any work)."""
    ext = Path(path).suffix.lower()
    formats = Image.registered_extensions()
    if ext not in formats or formats[ext] not in Image.SAVE:
        raise ImageError(f"cannot write {Path(path).name!r}: unknown image extension {ext or '(none)'!r}; use {COMMON_EXTENSIONS}")
    if not writes_rgb(formats[ext]):
        raise ImageError(f"cannot write {Path(path).name!r}: Pillow cannot write an RGB image as {formats[ext]} ({ext}); use {COMMON_EXTENSIONS}")
    return formats[ext]


def check_fits_format(path: str | Path, hw: tuple[int, int]) -> None:
    """ImageError, before any work, when the format of `path` cannot hold an (H, W) image (WebP
    stops at 16383 px a side, JPEG at 65500, GIF at 65535): found by writing a blank strip of
    each side's length (16 px thick: ICO makes its icon sizes from what fits inside), so a
    print-size run does not fail only once it is done."""
    fmt = output_format(path)
    h, w = hw
    for size in {(w, min(h, 16)), (min(w, 16), h)}:
        try:
            Image.new("RGB", size).save(io.BytesIO(), format=fmt)
        except Exception as e:  # noqa: BLE001 - as in `writes_rgb`
            detail = str(e).strip() or type(e).__name__
            raise ImageError(f"cannot write {Path(path).name!r}: {fmt} cannot hold a {w}x{h} image ({detail}); use .png or .tif") from None


def save_image(image: torch.Tensor | Image.Image, path: str | Path) -> Path:
    """Write an image atomically; the format comes from the extension."""
    path = Path(path)
    if path.is_dir():
        raise ImageError(f"cannot write {path}: it is a folder; give a file name such as {path / 'out.png'}")
    fmt = output_format(path)
    im = image if isinstance(image, Image.Image) else to_pil(image)
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    try:
        return write_atomic(path, lambda tmp: im.save(tmp, format=fmt, **options))
    except OSError as e:
        raise ImageError(f"cannot write {path}: {e.strerror or e}") from None
    except ValueError as e:  # an encoder's refusal (a size or mode the format cannot hold)
        raise ImageError(f"cannot write {path}: {e}") from None
