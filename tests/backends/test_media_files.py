"""media_files: input files checked before a backend opens them, outputs written atomically."""

from __future__ import annotations

from pathlib import Path

import pytest

from car_inference.backends.media_files import readable_file, variant_path, write_atomic
from car_inference.errors import InvalidInput


def test_readable_file_says_missing_folder_or_gives_the_path(tmp_path: Path) -> None:
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF")
    assert readable_file(str(audio), "audio file") == audio
    with pytest.raises(InvalidInput, match="audio file not found: "):
        readable_file(str(tmp_path / "none.wav"), "audio file")
    with pytest.raises(InvalidInput, match="audio file is a folder, not a file: "):
        readable_file(str(tmp_path), "audio file")


def test_write_atomic_leaves_no_part_file_and_variants_are_numbered(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and [p.name for p in tmp_path.glob("*out*")] == ["out.png"]
    assert variant_path(target, 0) == target and variant_path(target, 2).name == "out-3.png"
