"""A loss-curve PNG with no plotting library: lines drawn into a pixel buffer, written with zlib."""

from __future__ import annotations

import struct
import zlib

BLUE, ORANGE, GREY, WHITE = (31, 119, 180), (255, 127, 14), (160, 160, 160), (255, 255, 255)


def _png(width: int, height: int, pixels: list[bytearray]) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def loss_curves_png(train: list[tuple[float, float]], dev: list[tuple[float, float]], *, width: int = 640,
                    height: int = 320, margin: int = 24) -> bytes:
    """Train (blue) and dev (orange, thicker) loss against step; both axes share one scale."""
    pts = [p for p in train + dev if p[1] == p[1]]  # drop NaN
    pixels = [bytearray(WHITE * width) for _ in range(height)]

    def put(x: int, y: int, color) -> None:
        if 0 <= x < width and 0 <= y < height:
            pixels[y][3 * x:3 * x + 3] = bytes(color)

    def line(a, b, color, thick=1) -> None:
        (x0, y0), (x1, y1) = a, b
        n = max(abs(x1 - x0), abs(y1 - y0), 1)
        for i in range(n + 1):
            x, y = round(x0 + (x1 - x0) * i / n), round(y0 + (y1 - y0) * i / n)
            for dx in range(thick):
                for dy in range(thick):
                    put(x + dx, y + dy, color)

    line((margin, height - margin), (width - margin, height - margin), GREY)
    line((margin, margin), (margin, height - margin), GREY)
    if pts:
        x_lo, x_hi = min(p[0] for p in pts), max(p[0] for p in pts)
        y_lo, y_hi = min(p[1] for p in pts), max(p[1] for p in pts)

        def to_px(p):
            fx = (p[0] - x_lo) / ((x_hi - x_lo) or 1)
            fy = (p[1] - y_lo) / ((y_hi - y_lo) or 1)
            return margin + round(fx * (width - 2 * margin)), height - margin - round(fy * (height - 2 * margin))

        for series, color, thick in ((train, BLUE, 1), (dev, ORANGE, 2)):
            px = [to_px(p) for p in series if p[1] == p[1]]
            for a, b in zip(px, px[1:]):
                line(a, b, color, thick)
            if len(px) == 1:
                line(px[0], px[0], color, 3)
    return _png(width, height, pixels)
