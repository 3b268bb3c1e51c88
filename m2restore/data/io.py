"""Image files in and out: PNG, JPEG, WebP, TIFF and BMP; 8- and 16-bit, grayscale, RGB and with alpha.

The network sees RGB float32 in [0, 1]; everything else about a file (alpha, bit depth, whether
it was grayscale, its EXIF and ICC colour profile) travels beside the pixels in an
:class:`ImageData` so that a restored image can be written back in the form it came in. Pillow
does the work except for 16-bit colour PNGs, which Pillow reads and writes only as 8-bit; a small
numpy PNG codec covers those.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..paths import IMAGE_EXTENSIONS, find_images, is_image_file  # noqa: F401 - this module's API too

# Formats whose files can carry an alpha channel (as Pillow writes them); 16-bit samples only as PNG.
_ALPHA_EXTENSIONS = (".png", ".webp", ".tif", ".tiff")
# Formats Pillow writes EXIF and ICC profiles into.
_METADATA_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# ITU-R 601-2 luma, the weights Pillow uses for its own RGB -> L conversion.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass
class ImageData:
    """A decoded image.

    rgb: (H, W, 3) float32 in [0, 1] (grayscale files are repeated over the three channels).
    alpha: (H, W) float32 in [0, 1], or None when the file has no alpha channel.
    bit_depth: 8 or 16, the depth of the file's samples.
    grayscale: True when the file stores one colour channel.
    exif: the file's EXIF block (bytes, orientation already applied to the pixels), or None.
    icc_profile: the file's ICC colour profile (bytes), or None.
    """

    rgb: np.ndarray
    alpha: np.ndarray | None = None
    bit_depth: int = 8
    grayscale: bool = False
    exif: bytes | None = None
    icc_profile: bytes | None = None


class UnreadableImageError(ValueError):
    """A file that is not an image, or whose image data is truncated or corrupt.

    ``reason`` is the short cause (``"not an image"``, ``"truncated or corrupt"``), the message
    names the file and the decoder's complaint.
    """

    def __init__(self, path: Path, reason: str, detail: str):
        super().__init__(f"cannot read image {path}: {reason} ({detail})")
        self.path, self.reason = path, reason


def read_image(path: str | Path) -> ImageData:
    """Decode an image file Pillow reads (plus 16-bit colour PNG). Missing files raise
    FileNotFoundError, undecodable ones :class:`UnreadableImageError`; both messages name the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        header = _png_header(path)
        if header is not None and header[0] == 16 and header[1] != 0:
            with Image.open(path) as im:  # metadata only: Pillow decodes these pixels as 8-bit
                metadata = _metadata(im)
            image = _from_array(_read_png(path), 16)
        else:
            with Image.open(path) as im:
                im.load()
                im = ImageOps.exif_transpose(im)
                image, metadata = _from_pil(im), _metadata(im)
    except UnidentifiedImageError as e:
        raise UnreadableImageError(path, "not an image", str(e)) from e
    except (OSError, ValueError, SyntaxError, zlib.error, struct.error) as e:
        raise UnreadableImageError(path, "truncated or corrupt", str(e) or type(e).__name__) from e
    image.exif, image.icc_profile = metadata
    return image


def _metadata(im: Image.Image) -> tuple[bytes | None, bytes | None]:
    """(EXIF block, ICC profile) of an open image, None for what it lacks."""
    exif = im.getexif()
    return (exif.tobytes() if len(exif) else None), im.info.get("icc_profile") or None


def write_image(path: str | Path, image: ImageData, quality: int = 95) -> None:
    """Encode ``image`` by the file extension (one of :data:`IMAGE_EXTENSIONS`), at its bit depth
    (16 only as PNG, 8 elsewhere), in grayscale when ``image.grayscale``, with its alpha channel
    when it has one (PNG, WebP, TIFF), its EXIF and ICC profile (all but BMP)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in IMAGE_EXTENSIONS:
        raise ValueError(f"unsupported output format {ext!r} for {path}; use one of {', '.join(IMAGE_EXTENSIONS)}")
    if image.alpha is not None and ext not in _ALPHA_EXTENSIONS:
        raise ValueError(f"{ext} has no alpha channel; write {path.with_suffix('.png')} instead")
    depth = image.bit_depth if ext == ".png" else 8
    if depth not in (8, 16):
        raise ValueError(f"bit_depth must be 8 or 16, got {image.bit_depth}")
    rgb = np.clip(image.rgb, 0.0, 1.0)
    channels = [rgb @ _LUMA] if image.grayscale else [rgb[..., i] for i in range(3)]
    if image.alpha is not None:
        channels.append(np.clip(image.alpha, 0.0, 1.0))
    scale = 255.0 if depth == 8 else 65535.0
    stacked = np.stack(channels, axis=-1)
    del rgb, channels  # whole-image temporaries: restore_file's memory budget counts few of them
    stacked *= scale
    samples = np.rint(stacked, out=stacked).astype(np.uint8 if depth == 8 else np.uint16)
    del stacked
    path.parent.mkdir(parents=True, exist_ok=True)
    if depth == 16:
        _write_png16(path, samples, image.exif, image.icc_profile)
        return
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[samples.shape[-1]]
    im = Image.fromarray(samples[..., 0] if mode == "L" else samples, mode=mode)
    options = {"quality": quality} if ext in (".jpg", ".jpeg", ".webp") else {}
    if ext in _METADATA_EXTENSIONS:
        options.update({k: v for k, v in (("exif", image.exif), ("icc_profile", image.icc_profile)) if v})
    im.save(path, **options)


def _from_pil(im: Image.Image) -> ImageData:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale PNGs (Pillow decodes some as 32-bit "I" holding 16-bit values).
        return _from_array(np.asarray(im).astype(np.uint16), 16)
    has_alpha = im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)
    gray = im.mode in ("1", "L", "LA")
    target = ("LA" if has_alpha else "L") if gray else ("RGBA" if has_alpha else "RGB")
    return _from_array(np.asarray(im.convert(target)), 8)


def _from_array(samples: np.ndarray, depth: int) -> ImageData:
    """samples: (H, W) or (H, W, C) with C in 1..4, uint8 or uint16 -> ImageData."""
    x = samples.astype(np.float32) / (255.0 if depth == 8 else 65535.0)
    if x.ndim == 2:
        x = x[..., None]
    gray = x.shape[-1] in (1, 2)
    color = np.repeat(x[..., :1], 3, axis=-1) if gray else x[..., :3]
    alpha = x[..., -1] if x.shape[-1] in (2, 4) else None
    return ImageData(np.ascontiguousarray(color), alpha, depth, gray)


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) of a PNG file, None for any other file."""
    with open(path, "rb") as f:
        head = f.read(33)
    if head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}  # PNG colour type -> samples per pixel


def _read_png(path: Path) -> np.ndarray:
    """Decode a non-interlaced 8- or 16-bit grayscale/RGB PNG with or without alpha into
    (H, W, C) uint8 or uint16."""
    data = path.read_bytes()
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        pos += 12 + length
    if header is None:
        raise ValueError("PNG without IHDR chunk")
    width, height, depth, ctype, _, _, interlace = header
    if depth not in (8, 16) or ctype not in _CHANNELS or interlace:
        raise ValueError(f"unsupported PNG layout (depth {depth}, colour type {ctype}, interlace {interlace})")
    bpp = depth // 8 * _CHANNELS[ctype]
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    if raw.size != height * (width * bpp + 1):
        raise ValueError("PNG image data is truncated")
    raw = raw.reshape(height, width * bpp + 1)
    filters = raw[:, 0].astype(np.int64)
    if filters.max(initial=0) > 4:
        raise ValueError("PNG row filter type out of range")
    pixels = _unfilter(filters, raw[:, 1:].reshape(height, width, bpp))
    if depth == 16:
        pixels = pixels.view(">u2").astype(np.uint16)
    return pixels.reshape(height, width, _CHANNELS[ctype])


def _unfilter(filters: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Undo PNG row filters. rows: (H, W, bpp) uint8 filtered bytes -> reconstructed bytes.

    Each pixel depends on its left, upper and upper-left neighbours, so pixels on one
    anti-diagonal are independent: sweeping the H+W-1 diagonals vectorises the decode.
    """
    h, w, bpp = rows.shape
    out = np.zeros((h + 1, w + 1, bpp), np.int64)  # a zero row and column stand in for "outside"
    filt = rows.astype(np.int64)
    for d in range(h + w - 1):
        r = np.arange(max(0, d - w + 1), min(h, d + 1))
        c = d - r
        a, b, ul = out[r + 1, c], out[r, c + 1], out[r, c]
        p = a + b - ul
        pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - ul)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, ul))
        ft = filters[r][:, None]
        pred = np.select([ft == 1, ft == 2, ft == 3, ft == 4], [a, b, (a + b) // 2, paeth], 0)
        out[r + 1, c + 1] = (filt[r, c] + pred) & 0xFF
    return out[1:, 1:].astype(np.uint8)


def _write_png16(path: Path, samples: np.ndarray, exif: bytes | None = None, icc_profile: bytes | None = None) -> None:
    """Encode (H, W, C) uint16, C in 1..4, as a 16-bit PNG (rows filtered with "Up"), with an
    iCCP chunk for ``icc_profile`` and an eXIf chunk for ``exif`` when given."""
    h, w, c = samples.shape
    ctype = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = samples.astype(">u2").view(np.uint8).reshape(h, w * c * 2)
    up = rows.copy()
    up[1:] = rows[1:] - rows[:-1]  # uint8 arithmetic wraps, which is the PNG definition
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    metadata = b""
    if icc_profile:  # iCCP: name, NUL, compression method 0 (zlib), compressed profile
        metadata += chunk(b"iCCP", b"ICC Profile\0\0" + zlib.compress(icc_profile))
    if exif:  # eXIf holds the TIFF structure without the "Exif\0\0" prefix JPEG uses
        metadata += chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\0\0") else exif)
    path.write_bytes(
        _PNG_SIGNATURE
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, ctype, 0, 0, 0))
        + metadata
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )
