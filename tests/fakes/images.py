"""Small real images made in memory for vision and grounding tests (no files, no downloads)."""

from __future__ import annotations

import struct
import zlib

__all__ = ["png", "text_sign"]


def png(width: int, height: int, rgb: tuple[int, int, int] = (255, 255, 255)) -> bytes:
    """A valid, solid-colour RGB PNG of ``width`` x ``height``."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" + bytes(rgb) * width
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = zlib.compress(row * height)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def text_sign() -> bytes:
    """A 640x240 white PNG with "HELLO WORLD" at (40, 40) and "exit 42" at (300, 150) in 40 px
    type: text an OCR model reads (needs Pillow)."""
    import io

    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", (640, 240), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=40)
    draw.text((40, 40), "HELLO WORLD", fill="black", font=font)
    draw.text((300, 150), "exit 42", fill="black", font=font)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
