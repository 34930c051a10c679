"""Byte-level bad files for the bad-input tests: PNGs that pass a header check but not a decode."""

from __future__ import annotations

import struct
import zlib


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_with(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit RGB PNG of the stated size whose chunks all carry valid CRCs."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def garbage_png(side: int = 32) -> bytes:
    """Valid chunk CRCs, but the compressed data is not a zlib stream."""
    return png_with(side, side, b"\x78\x9c" + bytes(range(7, 250)))


def bomb_png(side: int = 20000) -> bytes:
    """A PNG claiming ``side x side`` pixels (20000^2 = 400 M: over Pillow's bomb limit)."""
    row = b"\x00" + b"\x00" * (3 * side)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(64)) + comp.flush()
    return png_with(side, side, data)
