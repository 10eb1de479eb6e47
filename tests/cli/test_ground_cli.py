"""`car ground`: the embedded OCR grounder for real, and a hosted Gemini that is the fake provider."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from car_inference.cli import app
from fakes import FakeProviderServer, Reply
from fakes.images import png, text_sign

runner = CliRunner()


def car(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def fake() -> Iterator[FakeProviderServer]:
    with FakeProviderServer() as server:
        yield server


def test_ground_text_with_the_embedded_ocr(tmp_path: Path) -> None:
    pytest.importorskip("rapidocr_onnxruntime")
    sign = tmp_path / "sign.png"
    sign.write_bytes(text_sign())
    code, out, err = car("ground", str(sign), "exit 42", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["model_used"] == "rapidai/pp-ocrv4-mobile" and (result["width"], result["height"]) == (
        640,
        240,
    )
    [box] = result["boxes"]
    assert 290 <= box["x1"] <= 310 and 405 <= box["x2"] <= 425 and box["label"] == "exit 42"
    code, out, err = car("ground", str(sign), "hello")
    assert code == 0, err
    assert "HELLO" in out.upper() and "image 640x240 px" in out
    code, out, _ = car("ground", str(sign), "the red car")
    assert code == 0 and "no box for 'the red car'" in out


def test_ground_through_hosted_gemini(
    tmp_path: Path, isolated_home: Path, fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_GEMINI_KEY", "k")
    (isolated_home / "models.toml").write_text(
        '[[models]]\nid = "google/fake-gemini"\nname = "fake-gemini"\nprovider = "google"\n'
        'family = "gemini-3"\n'
        'capabilities = ["generate", "vision", "grounding"]\n[models.source]\nkind = "gemini"\n'
        f'base_url = "{fake.gemini_base_url}"\napi_key_env = "FAKE_GEMINI_KEY"\nmodel_name = "gemini-test"\n'
    )
    image = tmp_path / "street.png"
    image.write_bytes(png(1000, 500))
    fake.queue(Reply(text='[{"box_2d": [100, 200, 600, 800], "label": "red car"}]'))
    code, out, err = car("ground", str(image), "the red car", "-m", "fake-gemini", "--json")
    assert code == 0, err
    assert json.loads(out)["boxes"] == [
        {"x1": 200.0, "y1": 50.0, "x2": 800.0, "y2": 300.0, "label": "red car"}
    ]
    fake.queue(Reply(text='[{"box_2d": [100, 200]}]'))
    code, _, err = car("ground", str(image), "the red car", "-m", "fake-gemini")
    assert code == 1 and "not four numbers" in err and "received" in err


def test_ground_usage_errors(tmp_path: Path) -> None:
    code, _, err = car("ground", str(tmp_path / "missing.png"), "car")
    assert code == 2 and "cannot read" in err
    image = tmp_path / "x.png"
    image.write_bytes(png(4, 4))
    code, _, err = car("ground", str(image), "car", "-m", "qwen2.5-vl-3bb")
    assert code == 2 and "qwen2.5-vl-3b" in err
    code, _, err = car("ground", str(image), "car", "-m", "qwen2.5-vl-3b")
    assert code == 1 and "pull" in err
    (tmp_path / "notes.png").write_text("not an image")
    code, _, err = car("ground", str(tmp_path / "notes.png"), "car", "-m", "ocr")
    assert code == 2 and "not a PNG" in err
    (tmp_path / "empty.png").write_bytes(b"")  # said "give exactly one of `url` or `data`"
    code, _, err = car("ground", str(tmp_path / "empty.png"), "car")
    assert code == 2 and "empty.png is empty (0 bytes)" in err
