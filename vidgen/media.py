"""Dependency-free image writers: PNG (zlib), animated GIF (LZW), and a line-plot rasteriser.

Used by the demo: Pillow and matplotlib are not installed in this package's environment, so the
files are written by hand (uint8 arrays ``[H, W]`` grey or ``[H, W, 3]`` RGB).
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["write_png", "write_gif", "plot_lines"]


def _as_u8(a, what: str) -> np.ndarray:
    """``a`` as uint8 without a silent cast: integer values must already lie in [0, 255] (a float
    image in [0, 1] was cast to all zeros)."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.integer) or (a.size and (a.min() < 0 or a.max() > 255)):
            raise TypeError(f"{what} must be uint8 (or integers in [0, 255]), got {a.dtype}"
                            f"{'' if not a.size else f' in [{a.min()}, {a.max()}]'}; scale float "
                            f"images with (x * 255).round().clip(0, 255).astype(np.uint8)")
    return np.ascontiguousarray(a, dtype=np.uint8)


def write_png(path: str, img: np.ndarray) -> None:
    """``img [H, W]`` grey or ``[H, W, 3]`` RGB, uint8 -> PNG."""
    img = _as_u8(img, "write_png: img")
    if img.ndim == 2:
        color = 0
    elif img.ndim == 3 and img.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"expected [H, W] or [H, W, 3] uint8, got {img.shape}")
    H, W = img.shape[:2]
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(H))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, color, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 6)))
        f.write(chunk(b"IEND", b""))


def _lzw_gray(pixels: bytes) -> bytes:
    """GIF LZW of 8-bit indices with a clear code every 254 codes: code width stays 9 bits
    (valid GIF, larger than optimal, trivial to encode)."""
    clear, eoi = 256, 257
    out, acc, nbits = bytearray(), 0, 0

    def emit(code):
        nonlocal acc, nbits
        acc |= code << nbits
        nbits += 9
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8

    for i in range(0, len(pixels), 254):
        emit(clear)
        for p in pixels[i:i + 254]:
            emit(p)
    emit(eoi)
    if nbits:
        out.append(acc & 0xFF)
    return bytes(out)


def write_gif(path: str, frames: np.ndarray, duration_ms: int = 150) -> None:
    """``frames [N, H, W]`` uint8 greyscale -> looping animated GIF."""
    frames = _as_u8(frames, "write_gif: frames")
    if frames.ndim != 3:
        raise ValueError(f"expected [N, H, W] uint8 frames, got {frames.shape}")
    N, H, W = frames.shape
    palette = bytes(np.repeat(np.arange(256, dtype=np.uint8), 3))
    with open(path, "wb") as f:
        f.write(b"GIF89a" + struct.pack("<HHBBB", W, H, 0xF7, 0, 0) + palette)
        f.write(b"\x21\xFF\x0BNETSCAPE2.0\x03\x01\x00\x00\x00")  # loop forever
        for fr in frames:
            f.write(b"\x21\xF9\x04\x00" + struct.pack("<H", max(1, duration_ms // 10)) + b"\x00\x00")
            f.write(b"\x2C" + struct.pack("<HHHHB", 0, 0, W, H, 0) + b"\x08")
            data = _lzw_gray(fr.tobytes())
            for i in range(0, len(data), 255):
                block = data[i:i + 255]
                f.write(bytes([len(block)]) + block)
            f.write(b"\x00")
        f.write(b"\x3B")


def _line(img, x0, y0, x1, y1, color):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    ok = (xs >= 0) & (xs < img.shape[1]) & (ys >= 0) & (ys < img.shape[0])
    img[ys[ok], xs[ok]] = color


def plot_lines(panels, width: int = 360, height: int = 220) -> np.ndarray:
    """Rasterise one panel per series list: ``panels = [[(values, (r, g, b)), ...], ...]`` side
    by side, each with axes, y on a log scale. No text (the report says what they are)."""
    imgs = []
    for series in panels:
        img = np.full((height, width, 3), 255, np.uint8)
        m = 20
        _line(img, m, m, m, height - m, (0, 0, 0))
        _line(img, m, height - m, width - m, height - m, (0, 0, 0))
        vals = [np.log10(np.maximum(np.asarray(v, float), 1e-8)) for v, _ in series if len(v)]
        if vals:
            lo, hi = min(v.min() for v in vals), max(v.max() for v in vals)
            hi = hi if hi > lo else lo + 1
            for k in range(1, 4):  # grid lines
                y = m + k * (height - 2 * m) / 4
                _line(img, m + 1, y, width - m, y, (225, 225, 225))
            for (v, color), lv in zip([s for s in series if len(s[0])], vals):
                xs = m + np.linspace(0, 1, len(lv)) * (width - 2 * m)
                ys = height - m - (lv - lo) / (hi - lo) * (height - 2 * m)
                for i in range(len(lv) - 1):
                    _line(img, xs[i], ys[i], xs[i + 1], ys[i + 1], color)
        imgs.append(img)
    return np.concatenate(imgs, axis=1)
