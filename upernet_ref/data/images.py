"""The one image reader: any image file as the network sees it, uint8 (3, H, W) RGB.

Datasets, `upernet predict` and `upernet data check` read images here, so a file that trains
also predicts, and the other way round. `IMAGE_SUFFIXES` is the one list of the suffixes they
collect.

- JPEG, PNG and WebP go to torchvision's decoders (libjpeg-turbo / libpng / libwebp; about 2x
  faster than PIL on a Cityscapes label), everything else (BMP, TIFF) to PIL, which is also
  the fallback when torchvision cannot decode a file.
- Grey, palette, CMYK and bilevel images become RGB; an alpha channel is dropped (the colours
  are kept as stored, what torchvision's RGB mode does).
- 16-bit images (grey or RGB PNG, 16-bit TIFF) are scaled to 8 bits, `round(v / 257)`, so
  65535 is 255 and the picture looks as meant. (PIL's own `convert("RGB")` clips 16-bit grey
  to 255: an all-white image.)
- A format neither can read, and floating-point images (their range is unknown), are refused
  with a `DataError` naming the file and the problem.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image

from upernet_ref.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

_TORCHVISION_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF")  # JPEG, PNG, WebP


def decode_bytes(data: bytes, mode: ImageReadMode = ImageReadMode.RGB) -> torch.Tensor:
    """torchvision's decoder on the bytes of a file ((C, H, W), uint8 or uint16).

    torchvision 0.29 marks its image I/O deprecated in favour of TorchCodec; the pinned
    version has it, so the warning is silenced here (per call: pytest resets global filters).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)


def to_uint8(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    """16-bit values (uint16, or int32 holding 0..65535) scaled to uint8 as round(v / 257)."""
    wide = torch.as_tensor(np.asarray(image, dtype=np.int32) if isinstance(image, np.ndarray)
                           else image.to(torch.int32))
    return ((wide + 128) // 257).to(torch.uint8)


def pil_to_rgb(im: Image.Image, name: str = "<image>") -> torch.Tensor:
    """A PIL image as uint8 (3, H, W) RGB (see the module docstring), or a DataError."""
    mode = im.mode
    if mode == "F" or mode.startswith("F;"):
        raise DataError(f"{name}: a floating-point image (PIL mode {mode}) has no fixed range; "
                        f"save it as 8- or 16-bit")
    if mode.startswith("I"):  # I;16, I;16B, I;16L (16-bit grey), I (32-bit)
        values = np.asarray(im, dtype=np.int64)
        if values.min(initial=0) < 0 or values.max(initial=0) > 65535:
            raise DataError(f"{name}: a 32-bit integer image (values {values.min()}.."
                            f"{values.max()}); save it as 8- or 16-bit")
        return to_uint8(values.astype(np.int32)).unsqueeze(0).expand(3, -1, -1).contiguous()
    if mode not in ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "1", "CMYK", "YCbCr"):
        raise DataError(f"{name}: images in PIL mode {mode!r} are not supported; save it as "
                        f"RGB or grey")
    rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)  # P/PA via their palette, alpha dropped
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def _pil_rgb(data: bytes, name: str) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return pil_to_rgb(im, name)


def decode_rgb(data: bytes, name: str = "<image>") -> torch.Tensor:
    """The bytes of an image file as uint8 (3, H, W) RGB, or a DataError naming `name`."""
    if data.startswith(_TORCHVISION_MAGIC):
        try:
            image = decode_bytes(data, ImageReadMode.RGB)
            return to_uint8(image) if image.dtype == torch.uint16 else image
        except (RuntimeError, ValueError):
            pass  # PIL reads some files libpng / libjpeg refuse; and says why in plain words
    try:
        return _pil_rgb(data, name)
    except DataError:
        raise
    except UnidentifiedImageError:
        problem = "not an image format PIL or torchvision can read"
    except (OSError, ValueError, SyntaxError) as err:  # truncated, corrupt
        problem = str(err) or type(err).__name__
    raise DataError(f"{name}: unreadable or truncated image ({problem})")


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as uint8 (3, H, W) RGB (see the module docstring), or a DataError naming it."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: image file is missing") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not an image") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the image ({err.strerror})") from None
    return decode_rgb(data, str(path))
