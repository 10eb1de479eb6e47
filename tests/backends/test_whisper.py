"""The faster-whisper backend on the embedded Whisper base (split across two packages), for real
and offline; its test audio is spoken by the embedded Piper voice."""

from __future__ import annotations

import itertools
import os
import re
import threading
import wave
from pathlib import Path

import pytest

from car_inference.backends.base import BackendContext
from car_inference.backends.cache import ModelCache
from car_inference.backends.piper import PiperBackend
from car_inference.backends.whisper import WhisperBackend, assemble_split_model
from car_inference.catalog import load_builtin
from car_inference.catalog.locate import whisper_parts
from car_inference.config import CarConfig
from car_inference.engine import InferenceEngine
from car_inference.errors import InferenceFailed, InvalidInput
from car_inference.requests import SynthesizeRequest, TranscribedSegment, TranscribeRequest
from car_inference.schema import ModelSchema, WhisperSource
from fakes.speech_texts import LONG_SPEECH

from .helpers import finish_order

WHISPER = "systran/faster-whisper-base"
JOE = "piper/en_us-joe-medium"
FOX = "The quick brown fox jumps over the lazy dog."
# Not "jumps": Piper adds random noise, and about one rendering in 25 is heard as "jumped".
FOX_WORDS = ("quick", "brown", "fox", "lazy", "dog")


def _builtin(model_id: str) -> ModelSchema:
    return next(m for m in load_builtin().models if m.id == model_id)


@pytest.fixture(scope="module")
def model() -> ModelSchema:
    return _builtin(WHISPER)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> BackendContext:
    config = CarConfig(home=tmp_path_factory.mktemp("home"))
    return BackendContext(config=config, cache=ModelCache(config.local.cache_mb))


@pytest.fixture(scope="module")
def backend(ctx: BackendContext) -> WhisperBackend:
    return WhisperBackend(ctx)


@pytest.fixture(scope="module")
async def fox_wav(ctx: BackendContext, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("audio") / "fox.wav"
    await PiperBackend(ctx).synthesize(_builtin(JOE), SynthesizeRequest(text=FOX, output_path=str(target)))
    return target


def _words(text: str) -> set[str]:
    return {w.strip(".,!?").lower() for w in text.split()}


def _heard(text: str) -> bool:
    """Every word of the sentence but at most one: Piper's voice samples noise inside its model on
    each call, and Whisper sometimes hears "quit" for "quick"."""
    return len(set(FOX_WORDS) - _words(text)) <= 1


async def test_round_trip_piper_to_whisper(
    backend: WhisperBackend, model: ModelSchema, fox_wav: Path
) -> None:
    result = await backend.transcribe(model, TranscribeRequest(audio_path=str(fox_wav)))
    assert _heard(result.text), result.text
    assert result.language == "en" and result.model_used == WHISPER and result.words == []


async def test_word_timestamps_are_monotonic(
    backend: WhisperBackend, model: ModelSchema, fox_wav: Path
) -> None:
    result = await backend.transcribe(
        model, TranscribeRequest(audio_path=str(fox_wav), timestamps=True, language="en-US", prompt="Foxes.")
    )
    assert result.language == "en"
    words = result.words
    assert _heard(" ".join(w.word for w in words))
    with wave.open(str(fox_wav), "rb") as wav:
        duration = wav.getnframes() / wav.getframerate()
    assert all(0 <= w.start <= w.end <= duration + 0.5 for w in words)
    assert all(a.start <= b.start and a.end <= b.end for a, b in itertools.pairwise(words))
    # The audio's length and Whisper's segments (OpenAI's verbose_json and subtitles use them).
    assert result.duration is not None and abs(result.duration - duration) < 0.05
    assert result.segments and " ".join(s.text for s in result.segments) == result.text
    assert all(0 <= s.start < s.end <= duration + 0.5 and s.tokens for s in result.segments)
    assert all(s.avg_logprob is not None and s.avg_logprob < 0 for s in result.segments)


def _with_silence(source: Path, target: Path, before_s: float, after_s: float) -> Path:
    """``source`` (16-bit mono WAV) with digital silence before and after it."""
    with wave.open(str(source), "rb") as wav:
        params, frames = wav.getparams(), wav.readframes(wav.getnframes())
    before, after = (b"\0\0" * int(seconds * params.framerate) for seconds in (before_s, after_s))
    with wave.open(str(target), "wb") as out:
        out.setparams(params)
        out.writeframes(before + frames + after)
    return target


async def test_silence_is_empty_text_and_speech_amid_silence_is_heard_whole(
    backend: WhisperBackend, model: ModelSchema, fox_wav: Path, tmp_path: Path
) -> None:
    """No speech at all (VAD) answers "" without decoding (Whisper looped on it for seconds); any
    speech is transcribed from the whole file, silence around it included."""
    silent = tmp_path / "silent.wav"
    with wave.open(str(fox_wav), "rb") as src, wave.open(str(silent), "wb") as out:
        out.setparams(src.getparams())
        out.writeframes(b"\0\0" * (src.getframerate() // 2))  # half a second
    quiet = await backend.transcribe(model, TranscribeRequest(audio_path=str(silent)))
    assert quiet.text == "" and quiet.words == [] and quiet.language is None and quiet.model_used == WHISPER
    said = await backend.transcribe(model, TranscribeRequest(audio_path=str(silent), language="en"))
    assert said.text == "" and said.language == "en" and said.duration and not said.segments
    padded = _with_silence(fox_wav, tmp_path / "padded.wav", 2.0, 3.0)
    heard = await backend.transcribe(model, TranscribeRequest(audio_path=str(padded), timestamps=True))
    assert _heard(heard.text), heard.text
    assert heard.words and heard.words[0].start >= 1.0  # the file's clock (2 s in; Whisper's timing is rough)


async def test_a_long_transcription_takes_turns_with_another_clients(
    backend: WhisperBackend, model: ModelSchema, ctx: BackendContext, fox_wav: Path, tmp_path: Path
) -> None:
    """Client a's minute of speech takes a turn of the model per 30-second window; client b's
    one sentence, sent once a's has started, is transcribed before a's is done (in one turn it
    waited for all of it). b's last turn (which finds its windows done) comes after a's second
    window, so a needs a third for the order to say anything: at 40 s both ended together and
    the order was a race (CI, stop 28). Sentences that differ: the same one repeated made
    Whisper fall back to sampling again and again (16 s for a window)."""
    long = tmp_path / "long.wav"
    speech = SynthesizeRequest(text=LONG_SPEECH, output_path=str(long))
    await PiperBackend(ctx).synthesize(_builtin(JOE), speech)
    finished = await finish_order(
        lambda: ctx.cache.get(f"whisper:{model.id}"),
        lambda: backend.transcribe(model, TranscribeRequest(audio_path=str(long))),
        lambda: backend.transcribe(model, TranscribeRequest(audio_path=str(fox_wav))),
    )
    assert finished == ["b", "a"]


async def test_each_segment_is_handed_over_as_it_is_decoded(
    backend: WhisperBackend, model: ModelSchema, fox_wav: Path, tmp_path: Path
) -> None:
    """``on_segment`` (what a streamed transcription sends) gets the result's segments, in order,
    from the worker thread decoding them, before the result exists."""
    padded = _with_silence(fox_wav, tmp_path / "padded.wav", 1.0, 1.0)
    handed: list[tuple[TranscribedSegment, str]] = []
    heard = await backend.transcribe(
        model,
        TranscribeRequest(audio_path=str(padded), language="en"),
        on_segment=lambda s: handed.append((s, threading.current_thread().name)),
    )
    assert heard.segments and [s for s, _ in handed] == heard.segments
    assert all(thread != threading.main_thread().name for _, thread in handed)


async def test_missing_and_bad_audio_files_are_named(
    backend: WhisperBackend, model: ModelSchema, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.wav"
    with pytest.raises(InvalidInput, match=re.escape(f"audio file not found: {missing}")):
        await backend.transcribe(model, TranscribeRequest(audio_path=str(missing)))
    with pytest.raises(InvalidInput, match="audio file is a folder, not a file"):
        await backend.transcribe(model, TranscribeRequest(audio_path=str(tmp_path)))  # a folder
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file" * 20)
    with pytest.raises(InvalidInput, match=re.escape(f"could not transcribe {garbage}: ")) as info:
        await backend.transcribe(model, TranscribeRequest(audio_path=str(garbage)))
    assert "Errno" not in str(info.value) and str(info.value).count(str(garbage)) == 1  # said once
    for name, data in (("cut.ogg", b"OggS"), ("x.aac", b"x"), ("empty.flac", b"")):
        bad = tmp_path / name  # PyAV's EOFError (click said "aborted"), or no samples: an empty answer
        bad.write_bytes(data)
        with pytest.raises(InvalidInput, match=re.escape(f"could not transcribe {bad}: ")):
            await backend.transcribe(model, TranscribeRequest(audio_path=str(bad)))


async def test_an_unknown_language_is_an_error(
    backend: WhisperBackend, model: ModelSchema, fox_wav: Path
) -> None:
    with pytest.raises(InvalidInput, match="does not know the language 'klingon'"):
        await backend.transcribe(model, TranscribeRequest(audio_path=str(fox_wav), language="klingon"))


def test_the_split_model_is_assembled_once_and_reused(
    backend: WhisperBackend, model: ModelSchema, ctx: BackendContext
) -> None:
    folder = backend.model_dir(model)
    assert folder.parent == ctx.config.paths.cache_dir / "whisper"
    assert {p.name for p in folder.iterdir()} >= {"model.bin", "config.json", "tokenizer.json"}
    assert isinstance(model.source, WhisperSource)
    parts = whisper_parts(model.source)
    assert parts is not None
    split = sorted((f for d in parts for f in d.glob("model.bin.part*")), key=lambda f: f.name)
    assert (folder / "model.bin").stat().st_size == sum(f.stat().st_size for f in split)
    stamp = (folder / "model.bin").stat().st_mtime_ns
    # A second backend (a new process, say) over the same $CAR_HOME finds the folder built.
    again = WhisperBackend(BackendContext(config=ctx.config, cache=ModelCache(1000))).model_dir(model)
    assert again == folder and (folder / "model.bin").stat().st_mtime_ns == stamp
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "no temporary folder left"


def test_assembly_joins_parts_in_numeric_order(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    (one / "config.json").write_text("{}")
    for i in (1, 2, 10):  # part10 sorts before part2 as text
        (one / f"w.bin.part{i}").write_bytes(b"a" * i)
    (two / "w.bin.part3").write_bytes(b"b")
    for i in range(4, 10):
        (two / f"w.bin.part{i}").write_bytes(bytes([48 + i]))
    root = tmp_path / "cache"
    folder = assemble_split_model([one, two], root)
    assert (folder / "w.bin").read_bytes() == b"a" + b"aa" + b"b" + b"456789" + b"a" * 10
    assert (folder / "config.json").read_text() == "{}"
    assert assemble_split_model([one, two], root) == folder
    (one / "config.json").write_text('{"changed": 1}')  # new content, new folder
    assert assemble_split_model([one, two], root) != folder
    (two / "w.bin.part5").unlink()
    with pytest.raises(InferenceFailed, match=r"not 1\.\.9"):
        assemble_split_model([one, two], root)


def test_a_joined_folder_cut_short_is_joined_again(tmp_path: Path) -> None:
    """A truncated model.bin in the joined folder failed every transcription: the folder was
    reused because it existed."""
    one = tmp_path / "one"
    one.mkdir()
    for i in (1, 2):
        (one / f"w.bin.part{i}").write_bytes(b"x" * 1000)
    folder = assemble_split_model([one], tmp_path / "cache")
    with open(folder / "w.bin", "r+b") as cut:
        cut.truncate(10)
    assert assemble_split_model([one], tmp_path / "cache") == folder
    assert (folder / "w.bin").read_bytes() == b"x" * 2000


async def test_a_joined_model_that_does_not_load_is_joined_again(
    model: ModelSchema, fox_wav: Path, tmp_path: Path
) -> None:
    """Damaged at its full size (what a size check cannot see), it failed "could not load" on
    every call while `car health` said ok: it is joined again once, and transcribes."""
    config = CarConfig(home=tmp_path / "home")
    backend = WhisperBackend(BackendContext(config=config, cache=ModelCache(config.local.cache_mb)))
    weights = backend.model_dir(model) / "model.bin"
    size = weights.stat().st_size
    with open(weights, "r+b") as damaged:
        damaged.write(b"\0" * 4096)
    assert weights.stat().st_size == size
    result = await backend.transcribe(model, TranscribeRequest(audio_path=str(fox_wav)))
    assert _heard(result.text), result.text


def test_a_path_source_is_used_as_it_is(backend: WhisperBackend, model: ModelSchema, tmp_path: Path) -> None:
    folder = backend.model_dir(model)
    direct = model.model_copy(update={"source": WhisperSource(path=str(folder))})
    assert backend.model_dir(direct) == folder
    empty = model.model_copy(update={"source": WhisperSource(path=str(tmp_path))})
    with pytest.raises(InferenceFailed, match=r"no model\.bin"):
        backend.model_dir(empty)


async def test_engine_speaks_and_transcribes_with_its_default_models(
    isolated_home: Path, tmp_path: Path
) -> None:
    engine = InferenceEngine()
    spoken = await engine.synthesize(
        SynthesizeRequest(text="Hello world, this is a speech test.", output_path=str(tmp_path / "hi.wav"))
    )
    assert spoken.model_used == JOE and os.path.getsize(spoken.audio_path) > 10_000
    heard = await engine.transcribe(TranscribeRequest(audio_path=spoken.audio_path, language="en"))
    assert heard.model_used == WHISPER
    assert _words(heard.text) >= {"hello", "world", "speech", "test"}, heard.text
    assert (isolated_home / "cache" / "whisper").is_dir()


async def test_audio_longer_than_the_bound_is_refused_before_it_is_all_decoded(
    model: ModelSchema, fox_wav: Path, tmp_path: Path
) -> None:
    """A file's size says nothing of its audio's length (1.3 MB of FLAC held 2 hours of silence
    and took 1.3 GB to decode): decoding stops at `[speech] max_audio_s`, as the client's error."""
    config = CarConfig(home=tmp_path / "home", speech={"max_audio_s": 60})  # type: ignore[arg-type]
    backend = WhisperBackend(BackendContext(config=config, cache=ModelCache(config.local.cache_mb)))
    long = _with_silence(fox_wav, tmp_path / "long.wav", 0.0, 65.0)
    with pytest.raises(InvalidInput, match=r"longer than 60 s \(\[speech\] max_audio_s\)"):
        await backend.transcribe(model, TranscribeRequest(audio_path=str(long)))
    short = _with_silence(fox_wav, tmp_path / "short.wav", 0.0, 30.0)
    result = await backend.transcribe(model, TranscribeRequest(audio_path=str(short)))
    assert _heard(result.text) and result.duration is not None and 30 < result.duration < 60
