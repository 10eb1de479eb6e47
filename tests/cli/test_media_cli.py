"""`car image` and `car video` on tiny random-weight diffusers pipelines named in models.toml."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from car_inference.cli import app
from car_inference.cli.media import progress_bar
from fakes.tiny_diffusers import build_ltx, build_sd

runner = CliRunner()


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd": build_sd(root / "sd"), "ltx": build_ltx(root / "ltx")}


@pytest.fixture
def home(isolated_home: Path, pipelines: dict[str, Path]) -> Path:
    entries = [
        ("test/tiny-sd", "image_generation", pipelines["sd"]),
        ("test/tiny-ltx", "video_generation", pipelines["ltx"]),
    ]
    toml = "".join(
        f'[[models]]\nid = "{model_id}"\nname = "{model_id[5:]}"\nprovider = "test"\n'
        f'capabilities = ["{capability}"]\ndefault_params = {{ steps = 2 }}\n'
        f'[models.source]\nkind = "diffusers"\npath = "{folder}"\n\n'
        for model_id, capability, folder in entries
    )
    (isolated_home / "models.toml").write_text(toml)
    return isolated_home


def car(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_image_writes_the_file_and_prints_its_path(home: Path, tmp_path: Path) -> None:
    target = tmp_path / "apple.png"
    code, out, err = car("image", "a red apple", "-o", str(target), "--size", "128x64", "--seed", "3")
    assert code == 0, err
    assert out.strip() == str(target) and "test/tiny-sd (128x64, seed 3)" in err
    assert Image.open(target).size == (128, 64)
    code, out, err = car(
        "image", "a red apple", "-o", str(tmp_path / "again.png"), "-s", "128x64", "--seed", "3"
    )
    assert code == 0, err
    assert (tmp_path / "again.png").read_bytes() == target.read_bytes()


def test_image_as_json_with_every_option(home: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(source)
    code, out, err = car(
        "image", "a blue cat", "-m", "tiny-sd", "-o", str(tmp_path / "cat.jpg"), "--steps", "3",
        "--guidance", "2.5", "--negative", "dog", "-n", "2", "--edit", str(source), "--json",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["model_used"] == "test/tiny-sd" and result["media_type"] == "image/jpeg"
    assert result["image_paths"] == [str(tmp_path / "cat.jpg"), str(tmp_path / "cat-2.jpg")]
    assert all(Image.open(p).format == "JPEG" for p in result["image_paths"])


def test_video_writes_an_mp4(home: Path, tmp_path: Path) -> None:
    target = tmp_path / "moon.mp4"
    code, out, err = car(
        "video", "a dog on the moon", "-o", str(target), "-s", "64x64", "--fps", "8", "-d", "1"
    )
    assert code == 0, err
    assert out.strip() == str(target) and "test/tiny-ltx (64x64, 1.125 s, video/mp4)" in err
    with av.open(str(target)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (64, 64)
    code, out, err = car(
        "video", "sky", "-o", str(tmp_path / "sky.gif"), "-s", "64x64", "--fps", "4", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["media_type"] == "image/gif"
    first = tmp_path / "first.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(first)
    code, out, err = car(
        "video", "it moves", "--image", str(first), "-s", "64x64", "-o", str(tmp_path / "i.mp4")
    )
    assert code == 0, err
    assert out.strip() == str(tmp_path / "i.mp4") and (tmp_path / "i.mp4").stat().st_size > 0


def test_mistakes_are_one_line_usage_errors(home: Path, tmp_path: Path) -> None:
    code, _, err = car("image", "x", "-m", "tiny-sdd")
    assert code == 2 and "model not found: tiny-sdd" in err and "tiny-sd" in err
    code, _, err = car("image", "x", "--size", "big")
    assert code == 2 and "--size must be WIDTHxHEIGHT" in err
    code, _, err = car("image", "x", "-o", str(tmp_path / "x.bmp"))
    assert code == 2 and "cannot write bmp files" in err
    code, _, err = car("image", "x", "--size", "32x32")
    # Named as the option the user typed, not as the request's field ("width:", "steps:").
    assert code == 2 and err.strip().startswith("error: Invalid value for '--size' (width):")
    code, _, err = car("image", "x", "--steps", "5000")
    assert code == 2 and err.strip().startswith("error: Invalid value for '--steps': "), err
    code, _, err = car("image", "x", "-s", "65x64")
    assert code == 2 and "multiples of 2 pixels" in err and len(err.strip().splitlines()) == 1
    code, _, err = car("video", "x", "-m", "test/tiny-sd")
    assert code == 2 and "does not declare video_generation" in err


def test_without_a_model_says_what_would_make_one_run(isolated_home: Path) -> None:
    code, _, err = car("video", "x")
    assert code == 1 and "no video_generation model can run here: " in err
    assert "car models pull lightricks/ltx-video" in err and "GEMINI_API_KEY" in err


def test_the_progress_bar_follows_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CAR_NO_SPINNER", raising=False)
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=80)
    with progress_bar(console, "Generating") as report:
        assert report is not None
        report(1, 4)
        report(4, 4)
    assert "4/4" in screen.getvalue()
    with progress_bar(Console(file=io.StringIO()), "Generating") as report:
        assert report is None  # not a terminal: nothing drawn
