"""media_files: input files checked before a backend opens them, outputs written atomically."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from car_inference.backends.media_files import (
    atomic_file,
    output_path,
    readable_file,
    variant_path,
    write_atomic,
)
from car_inference.errors import InvalidInput


def test_readable_file_says_missing_folder_or_gives_the_path(tmp_path: Path) -> None:
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF")
    assert readable_file(str(audio), "audio file") == audio
    with pytest.raises(InvalidInput, match="audio file not found: "):
        readable_file(str(tmp_path / "none.wav"), "audio file")
    with pytest.raises(InvalidInput, match="audio file is a folder, not a file: "):
        readable_file(str(tmp_path), "audio file")
    for empty in ("", "  "):  # "" is the current folder to Path: "a folder, not a file: ."
        with pytest.raises(InvalidInput, match="no audio file given: the path is empty"):
            readable_file(empty, "audio file")


def test_write_atomic_leaves_no_part_file_and_variants_are_numbered(tmp_path: Path) -> None:
    target = tmp_path / "out.png"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two" and [p.name for p in tmp_path.glob("*out*")] == ["out.png"]
    assert variant_path(target, 0) == target and variant_path(target, 2).name == "out-3.png"


def test_output_paths_write_through_links_and_refuse_what_is_not_a_file(tmp_path: Path) -> None:
    """The atomic rename put a regular file in place of /dev/full, a FIFO or a symbolic link."""
    real = tmp_path / "real.wav"
    real.write_bytes(b"old")
    link = tmp_path / "link.wav"
    link.symlink_to(real)
    target = output_path(str(link), "wav", "x-")
    assert target == real.resolve()
    write_atomic(target, b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"
    fifo = tmp_path / "fifo.wav"
    os.mkfifo(fifo)
    for special in (fifo, Path("/dev/null")):
        with pytest.raises(InvalidInput, match="it is not a regular file"):
            output_path(str(special), "wav", "x-")
    with pytest.raises(InvalidInput, match=r"real\.wav is not a folder"):
        output_path(str(real / "x.wav"), "wav", "x-")


def test_a_folder_no_file_can_be_made_in_is_refused_before_the_work(tmp_path: Path) -> None:
    """/proc/out.png (or a read-only folder): the error came after the paid call, uncharged, and
    counted against the model."""
    with pytest.raises(InvalidInput, match=r"cannot write /proc/out\.png: "):
        output_path("/proc/out.png", "png", "x-")
    folder = tmp_path / "out"
    folder.mkdir()
    assert output_path(str(folder / "out.png"), "png", "x-") == folder / "out.png"
    assert list(folder.iterdir()) == [], "the check leaves nothing behind"


def test_a_replaced_file_keeps_its_permissions(tmp_path: Path) -> None:
    private = tmp_path / "private.wav"
    private.write_bytes(b"old")
    private.chmod(0o600)
    write_atomic(private, b"new")
    assert private.read_bytes() == b"new" and stat.S_IMODE(private.stat().st_mode) == 0o600


def test_a_failed_write_leaves_the_old_file_and_no_part(tmp_path: Path) -> None:
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(kept) as file:
        file.write(b"half")
        raise RuntimeError("the encoder failed")
    assert kept.read_bytes() == b"old" and [p.name for p in tmp_path.glob("*kept*")] == ["kept.bin"]
