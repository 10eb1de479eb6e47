"""`car speak` and `car transcribe` on the embedded Piper and Whisper models, in-process."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import pytest
from typer.testing import CliRunner

from car_inference.cli import app
from fakes import FakeProviderServer
from fakes.provider_speech import wav
from fakes.speech_texts import TWO_WINDOWS

runner = CliRunner()


def car(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_speak_then_transcribe_as_json(tmp_path: Path) -> None:
    target = tmp_path / "fox.wav"
    code, out, err = car("speak", "The quick brown fox jumps over the lazy dog.", "-o", str(target), "--json")
    assert code == 0, err
    spoken = json.loads(out)
    assert spoken == {
        "audio_path": str(target),
        "media_type": "audio/wav",
        "model_used": "piper/en_us-joe-medium",
        "voice_used": "en_US-joe-medium",
    }
    with wave.open(str(target), "rb") as wav:
        assert wav.getframerate() == 22050 and wav.getnframes() > 22050

    code, out, err = car("transcribe", str(target), "--timestamps", "--json", "--language", "en")
    assert code == 0, err
    heard = json.loads(out)
    assert heard["model_used"] == "systran/faster-whisper-base" and heard["language"] == "en"
    assert "brown fox" in heard["text"] and "lazy dog" in heard["text"]
    starts = [w["start"] for w in heard["words"]]
    assert len(starts) >= 9 and starts == sorted(starts)


def test_human_output_keeps_stdout_for_the_result(tmp_path: Path) -> None:
    code, out, err = car("speak", "Good morning.", "-o", str(tmp_path / "gm.flac"), "--speed", "1.5")
    assert code == 0, err
    assert out.strip() == str(tmp_path / "gm.flac") and "audio/flac" in err
    assert (tmp_path / "gm.flac").read_bytes()[:4] == b"fLaC"
    code, out, err = car("transcribe", str(tmp_path / "gm.flac"), "-l", "en")
    assert code == 0, err
    assert "good morning" in out.lower() and "systran/faster-whisper-base (en)" in err


def test_errors_are_one_line_with_the_right_exit_status(tmp_path: Path) -> None:
    # Input the user must fix: a usage error (2), like an unknown model.
    code, _, err = car("transcribe", str(tmp_path / "missing.wav"))
    assert code == 2 and err.strip() == f"error: audio file not found: {tmp_path / 'missing.wav'}"
    code, _, err = car("speak", "  ")
    assert code == 2 and "nothing to synthesize" in err and len(err.strip().splitlines()) == 1
    code, _, err = car("speak", "hi", "-o", str(tmp_path / "x.ogg"))
    assert code == 2 and "cannot write .ogg files" in err
    code, _, err = car("speak", "hi", "--format", "opus")
    assert code == 2 and "--format must be one of wav, mp3, flac, pcm" in err
    code, _, err = car("transcribe", str(tmp_path / "missing.wav"), "--model", "no-such-whisper")
    assert code == 2 and "model not found: no-such-whisper" in err


def test_an_unknown_voice_is_a_usage_error_listing_the_voices(tmp_path: Path) -> None:
    code, _, err = car("speak", "hi", "--voice", "nosuch", "-o", str(tmp_path / "x.wav"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has no voice 'nosuch'; its voices: en_US-joe-medium" in err
    assert not (tmp_path / "x.wav").exists()


def test_list_voices_and_the_configured_openai_names(tmp_path: Path, isolated_home: Path) -> None:
    """--list-voices shows what --voice takes; "alloy" speaks only once [speech] voices maps it."""
    code, out, err = car("speak", "--list-voices")
    assert code == 0, err
    assert out.splitlines() == ["en_US-joe-medium  (default)"] and "piper/en_us-joe-medium: 1 voice" in err
    code, _, err = car("speak", "hi", "--voice", "alloy", "-o", str(tmp_path / "a.wav"))
    assert code == 2 and "its voices: en_US-joe-medium" in err and "[speech] voices" in err
    (isolated_home / "config.toml").write_text('[speech]\nvoices = { alloy = "en_US-joe-medium" }\n')
    code, out, _ = car("speak", "--list-voices", "--json")
    assert code == 0 and json.loads(out)["aliases"] == {"alloy": "en_US-joe-medium"}
    code, out, err = car("speak", "--list-voices")
    assert "alloy -> en_US-joe-medium  ([speech] voices)" in out
    code, out, err = car("speak", "hi", "--voice", "alloy", "-o", str(tmp_path / "a.wav"))
    assert code == 0 and "voice en_US-joe-medium" in err
    code, _, err = car("speak", "--list-voices", "-m", "whisper-base")
    assert code == 2 and "does not declare text_to_speech" in err
    code, _, err = car("speak")
    assert code == 2 and "give the text to speak (or --list-voices)" in err


def test_the_output_folder_must_exist(tmp_path: Path) -> None:
    target = tmp_path / "nonexistent" / "dir" / "x.wav"
    code, _, err = car("speak", "hi", "-o", str(target))
    assert code == 2 and f"cannot write {target}: {target.parent} does not exist" in err
    assert not (tmp_path / "nonexistent").exists()


def test_prefer_local_false_with_a_key_speaks_and_listens_hosted(
    tmp_path: Path, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with FakeProviderServer() as fake:
        (isolated_home / "models.toml").write_text(f'[hosts.openai]\nbase_url = "{fake.openai_base_url}"\n')
        monkeypatch.setenv("CAR_SPEECH__PREFER_LOCAL", "false")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-cli-speech")
        target = tmp_path / "hosted.mp3"
        code, out, err = car("speak", "the hosted voice", "-o", str(target), "--json")
        assert code == 0, err
        assert json.loads(out) | {"audio_path": ""} == {
            "audio_path": "",
            "media_type": "audio/mpeg",
            "model_used": "openai/gpt-4o-mini-tts",
            "voice_used": "alloy",
        }
        assert target.read_bytes().startswith(b"ID3")
        wav_file = tmp_path / "hosted.wav"
        wav_file.write_bytes(wav("heard by the hosted model"))
        code, out, err = car("transcribe", str(wav_file))
        assert code == 0, err
        assert out.strip() == "heard by the hosted model" and "openai/gpt-transcribe" in err
        assert [r.api_key for r in fake.requests] == ["sk-cli-speech", "sk-cli-speech"]


def test_speech_smoke_on_the_embedded_piper_and_whisper() -> None:
    code, out, err = car("speech", "smoke", "--json", "--keep-audio")
    assert code == 0, err
    report = json.loads(out)
    assert report["skipped"] == ["remote"]
    (path,) = report["paths"]
    assert (path["side"], path["tts_model"], path["stt_model"]) == (
        "local",
        "piper/en_us-joe-medium",
        "systran/faster-whisper-base",
    )
    # Piper samples noise on every call: allow one misheard word of nine.
    assert path["word_error_rate"] <= 1 / 9, path["transcript"]
    assert path["audio_s"] > 1.5 and path["synthesize_ms"] > 0 and path["transcribe_ms"] > 0
    kept = Path(path["audio_path"])
    assert kept.is_file() and kept.parent.name.startswith("car-smoke-")
    shutil.rmtree(kept.parent)


def test_speech_smoke_remote_in_words_and_its_limits(
    isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = car("speech", "smoke", "--no-local")
    assert code == 2 and "nothing to test" in err
    code, _, err = car("speech", "smoke", "--text", " ")  # spoke the default sentence instead
    assert code == 2 and "--text is empty" in err
    with FakeProviderServer() as fake:
        (isolated_home / "models.toml").write_text(f'[hosts.openai]\nbase_url = "{fake.openai_base_url}"\n')
        monkeypatch.setenv("OPENAI_API_KEY", "sk-cli-smoke")
        code, out, err = car("speech", "smoke", "--no-local", "--remote", "--text", "Say it back.")
        assert code == 0, err
        assert "remote: WER 0%  openai/gpt-4o-mini-tts -> openai/gpt-transcribe" in out
        assert "heard: Say it back." in out
        fake.speech.heard = "say it black"
        code, out, err = car(
            "speech", "smoke", "--no-local", "--remote", "--text", "Say it back.", "--max-wer", "0.2"
        )
        assert code == 1 and "remote: WER 33%" in out
        assert "word error rate 33% is above --max-wer 20%" in err


def test_in_a_terminal_the_transcript_is_printed_as_it_is_decoded(tmp_path: Path) -> None:
    """On a terminal `car transcribe` prints each 30-second window's text as Whisper decodes it
    (it printed nothing until the whole file was done), then ends the line; the words are those
    the piped command prints whole."""
    import os
    import pty
    import select
    import subprocess
    import sys
    import time

    target = tmp_path / "long.wav"
    code, _, err = car("speak", TWO_WINDOWS, "-o", str(target))
    assert code == 0, err
    screen, terminal = pty.openpty()
    command = [sys.executable, "-m", "car_inference", "transcribe", str(target), "-l", "en"]
    child = subprocess.Popen(command, stdout=terminal, stderr=subprocess.PIPE)
    os.close(terminal)
    arrivals: list[tuple[float, bytes]] = []  # when each piece of the screen came
    try:
        while True:
            ready, _, _ = select.select([screen], [], [], 120)
            try:
                chunk = os.read(screen, 4096) if ready else b""
            except OSError:  # the child closed the terminal and it is drained
                chunk = b""
            if not chunk:
                break
            arrivals.append((time.monotonic(), chunk))
        _, stderr = child.communicate(timeout=120)
    finally:
        child.kill()
        os.close(screen)
    shown = b"".join(chunk for _, chunk in arrivals)
    assert child.returncode == 0 and b"Traceback" not in stderr, stderr
    assert shown.endswith(b"\r\n"), shown
    code, piped, _ = car("transcribe", str(target), "-l", "en")
    assert code == 0 and shown.decode().split() == piped.split(), (shown, piped)
    # The first words came a window's decoding before the last ones (printed whole, both came in
    # one write; timed to the process's exit, a loaded machine's teardown blurred it).
    texts = [at for at, chunk in arrivals if chunk.strip()]
    assert texts[-1] - texts[0] > 0.3, "the first window was shown while the second was decoded"
