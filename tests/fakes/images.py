"""Small real images made in memory for vision and grounding tests (no files, no downloads)."""

from __future__ import annotations

import struct
import zlib

__all__ = ["png"]


def png(width: int, height: int, rgb: tuple[int, int, int] = (255, 255, 255)) -> bytes:
    """A valid, solid-colour RGB PNG of ``width`` x ``height``."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" + bytes(rgb) * width
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(row * height)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
