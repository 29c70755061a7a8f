"""
Reading whatever images users have, as RGB, or failing with one clear line.

CLIP wants an upright 8-bit RGB picture. Files come as JPEG, PNG, WebP, GIF (we take the first
frame), greyscale, RGBA (composited on white), CMYK, 16-bit, or rotated by an EXIF tag; some are
not images at all, truncated, or decompression bombs. load_image handles the first kind and turns
the second into an ImageError whose message says what is wrong with which file.
"""

import os
import warnings

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class ImageError(Exception):
    """An image that cannot be read; str(e) is one line that names the file."""


def _to_rgb(im):
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit greyscale: rescale to 8 bits
        a = np.asarray(im, dtype=np.float32)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("RGB")  # also CMYK, L, P, YCbCr


def load_image(path):
    """An upright RGB PIL image from `path`, or ImageError."""
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ImageError(f"{path}: is a folder, not an image")
    if os.path.getsize(path) == 0:
        raise ImageError(f"{path}: empty file (0 bytes)")
    return decode_image(path, path)


def decode_image(source, name):
    """An upright RGB PIL image from a path or a file object (a tar member's bytes in io.BytesIO), or
    ImageError whose message starts with `name`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # refuse, don't just warn
            with Image.open(source) as im:
                im.seek(0)  # the first frame of a GIF or other animation
                im = ImageOps.exif_transpose(im)  # honour the camera's rotation tag
                im.load()  # decode now, so that a truncated file fails here
                return _to_rgb(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: too many pixels (over {Image.MAX_IMAGE_PIXELS}), refused as a possible "
                         f"decompression bomb; resize it first") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not an image PIL can read (supported: JPEG, PNG, WebP, GIF, BMP, TIFF)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise ImageError(f"{name}: corrupt or truncated image ({e})") from None


def find_images(paths):
    """Expand folders (their image files, sorted, not recursive). Returns (files, errors)."""
    files, errors = [], []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(p, f) for f in os.listdir(p) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                errors.append(f"{p}: folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        else:
            files.append(p)
    return files, errors
