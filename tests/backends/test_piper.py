"""The Piper backend on the embedded en_US-joe-medium voice, for real (offline)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import resource
import tempfile
import wave
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal, TypedDict, TypeVar

import numpy as np
import pytest

from car_inference.backends.base import BackendContext
from car_inference.backends.cache import ModelCache
from car_inference.backends.piper import PCM_RATE, PiperBackend, _fits, _pieces, resampled, voice_file
from car_inference.catalog import load_builtin
from car_inference.config import CarConfig, SpeechSettings
from car_inference.errors import InferenceFailed, InvalidInput
from car_inference.requests import SynthesizeRequest
from car_inference.schema import ModelSchema, PiperSource

from .helpers import cancel_once_started, finish_order

JOE = "piper/en_us-joe-medium"
FOX = "The quick brown fox jumps over the lazy dog."
# One sentence of 416 characters, 865 phoneme ids: longer than Piper gets in one run.
DICKENS = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age "
    "of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season "
    "of Light, it was the season of Darkness, it was the spring of hope, it was the winter of "
    "despair, we had everything before us, we had nothing before us, we were all going direct to "
    "Heaven, we were all going direct the other way."
)

T = TypeVar("T")


@pytest.fixture(scope="module")
def model() -> ModelSchema:
    return next(m for m in load_builtin().models if m.id == JOE)


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> PiperBackend:
    config = CarConfig(home=tmp_path_factory.mktemp("home"))
    return PiperBackend(BackendContext(config=config, cache=ModelCache(config.local.cache_mb)))


def _wav_seconds(path: str | Path) -> float:
    with wave.open(str(path), "rb") as wav:
        return wav.getnframes() / wav.getframerate()


def _unpunctuated(length: int, choices: Sequence[str], sep: str = "") -> str:
    """``length`` characters of ``choices`` drawn at random and joined by ``sep``: no sentence end,
    nothing to cut at but spaces."""
    rng = random.Random(length)
    drawn = [rng.choice(choices) for _ in range(length)]
    return sep.join(drawn)[:length].strip()


def _status_kb(field: str) -> int:
    found = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert found, field
    return int(found[1])


async def _peak_rss_growth_mb(call: Callable[[], Awaitable[T]], cap_gb: float = 6.0) -> tuple[T, float]:
    """``call()``'s result and how much the process's peak RSS grew over it, in MB (Linux's VmHWM,
    reset first), with its address space capped ``cap_gb`` above its size meanwhile: a regression
    fails the test instead of taking the machine's memory (unbounded, 4,096 characters took 24 GB)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pytest.skip("measures peak memory in Linux's /proc/self")
    before = _status_kb("VmRSS")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _status_kb("VmSize") * 1024 + int(cap_gb * 2**30)
    limit = min(v for v in (cap, soft, hard) if v != resource.RLIM_INFINITY)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        result = await call()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    return result, (_status_kb("VmHWM") - before) / 1024


def test_the_voice_config_sits_beside_the_onnx_file(model: ModelSchema) -> None:
    onnx = voice_file(model)
    assert onnx.name == "en_US-joe-medium.onnx"
    assert onnx.with_name(onnx.name + ".json").is_file()


async def test_writes_a_valid_wav(backend: PiperBackend, model: ModelSchema, tmp_path: Path) -> None:
    target = tmp_path / "out" / "fox.wav"
    target.parent.mkdir()
    result = await backend.synthesize(model, SynthesizeRequest(text=FOX, output_path=str(target)))
    assert result.audio_path == str(target) and result.media_type == "audio/wav"
    assert result.model_used == JOE and result.voice_used == "en_US-joe-medium"
    assert target.read_bytes()[:4] == b"RIFF" and target.read_bytes()[8:12] == b"WAVE"
    with wave.open(str(target), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 22050)
    assert 1.5 < _wav_seconds(target) < 5.0
    assert os.listdir(target.parent) == ["fox.wav"], "no temporary file is left behind"


async def test_overwrites_an_existing_file(backend: PiperBackend, model: ModelSchema, tmp_path: Path) -> None:
    target = tmp_path / "hi.wav"
    target.write_bytes(b"old")
    await backend.synthesize(model, SynthesizeRequest(text="Hi.", output_path=str(target)))
    assert target.read_bytes()[:4] == b"RIFF"


async def test_speed_changes_the_duration(backend: PiperBackend, model: ModelSchema, tmp_path: Path) -> None:
    seconds = {}
    for speed in (0.5, 1.0, 2.0):
        target = tmp_path / f"{speed}.wav"
        await backend.synthesize(model, SynthesizeRequest(text=FOX, output_path=str(target), speed=speed))
        seconds[speed] = _wav_seconds(target)
    # Piper adds random noise to phoneme lengths, so the ratios are only roughly 2x.
    assert seconds[2.0] < 0.7 * seconds[1.0] < 0.7 * 0.7 * seconds[0.5]


async def test_other_formats(backend: PiperBackend, model: ModelSchema, tmp_path: Path) -> None:
    magic = {"mp3": (b"ID3", b"\xff\xf3", b"\xff\xfb", b"\xff\xf2"), "flac": (b"fLaC",)}
    formats: tuple[tuple[Literal["pcm", "mp3", "flac"], str], ...] = (
        ("pcm", "audio/pcm"),
        ("mp3", "audio/mpeg"),
        ("flac", "audio/flac"),
    )
    for fmt, media_type in formats:
        target = tmp_path / f"hello.{fmt}"
        result = await backend.synthesize(
            model, SynthesizeRequest(text="Hello.", output_path=str(target), format=fmt)
        )
        data = target.read_bytes()
        assert result.media_type == media_type and len(data) > 1000, fmt
        if fmt == "pcm":
            assert len(data) % 2 == 0 and data[:4] != b"RIFF"  # raw s16le, no header
        else:
            assert data.startswith(magic[fmt]), fmt


async def test_raw_pcm_is_at_24_khz_as_openais(
    backend: PiperBackend, model: ModelSchema, tmp_path: Path
) -> None:
    """Raw pcm has no header to say its rate; OpenAI's and ElevenLabs' are 24 kHz, and a client
    written for them played Piper's 22,050 Hz about 9 % fast."""
    request = SynthesizeRequest(text="Hello there.", output_path=str(tmp_path / "a.wav"))
    wav_result = await backend.synthesize(model, request)
    with wave.open(wav_result.audio_path, "rb") as wav:
        rate, frames = wav.getframerate(), wav.readframes(wav.getnframes())
    assert rate == 22050
    pcm = resampled(frames, rate, PCM_RATE)
    assert abs(len(pcm) / 2 / PCM_RATE - len(frames) / 2 / rate) < 0.001  # the same duration
    # A tone keeps its pitch: 440 Hz at 22,050 Hz is 440 Hz at 24,000 Hz.
    t = np.arange(22050) / 22050
    tone = (np.sin(2 * np.pi * 440 * t) * 10000).astype("<i2").tobytes()
    out = np.frombuffer(resampled(tone, 22050, PCM_RATE), dtype="<i2").astype(float)
    assert len(out) == 24000 and abs(np.argmax(np.abs(np.fft.rfft(out))) - 440) <= 1
    target = tmp_path / "a.pcm"
    await backend.synthesize(model, SynthesizeRequest(text="Hello there.", output_path=str(target)))
    seconds = len(target.read_bytes()) / 2 / PCM_RATE
    assert abs(seconds - len(frames) / 2 / rate) < 0.5  # Piper varies its timing a little per run


async def test_without_an_output_path_a_temporary_file_is_made(
    backend: PiperBackend, model: ModelSchema
) -> None:
    result = await backend.synthesize(model, SynthesizeRequest(text="Hello."))
    path = Path(result.audio_path)
    try:
        assert path.parent == Path(tempfile.gettempdir()) and path.suffix == ".wav"
        assert path.read_bytes()[:4] == b"RIFF"
    finally:
        path.unlink()


async def test_text_with_nothing_to_say_is_an_error(
    backend: PiperBackend, model: ModelSchema, tmp_path: Path
) -> None:
    for text in ("", "   \n"):
        with pytest.raises(InvalidInput, match="text is empty"):
            await backend.synthesize(model, SynthesizeRequest(text=text, output_path=str(tmp_path / "x.wav")))
    with pytest.raises(InvalidInput, match="nothing to pronounce"):
        await backend.synthesize(model, SynthesizeRequest(text="...", output_path=str(tmp_path / "x.wav")))
    assert not (tmp_path / "x.wav").exists()
    before = set(Path(tempfile.gettempdir()).glob("car-tts-*"))
    with pytest.raises(InvalidInput, match="nothing to pronounce"):
        await backend.synthesize(model, SynthesizeRequest(text="..."))  # into a temporary file
    assert set(Path(tempfile.gettempdir()).glob("car-tts-*")) == before, "the failed request's file stayed"


async def test_an_unwritable_output_path_is_an_error(
    backend: PiperBackend, model: ModelSchema, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InvalidInput, match=r"cannot write .*a-file/x\.wav: .*a-file is not a folder"):
        await backend.synthesize(model, SynthesizeRequest(text="Hi.", output_path=str(blocker / "x.wav")))
    # A folder that does not exist is not made: a typo in a path must not create folders.
    missing = tmp_path / "no" / "such" / "x.wav"
    with pytest.raises(InvalidInput, match=r"cannot write .*x\.wav: .*such does not exist"):
        await backend.synthesize(model, SynthesizeRequest(text="Hi.", output_path=str(missing)))
    assert not (tmp_path / "no").exists()
    with pytest.raises(InvalidInput, match="it is a folder"):
        await backend.synthesize(model, SynthesizeRequest(text="Hi.", output_path=str(tmp_path)))
    # The file system's own refusal is still a failure to write.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root writes anywhere
        with pytest.raises(InferenceFailed, match="cannot write audio to"):
            await backend.synthesize(model, SynthesizeRequest(text="Hi.", output_path=str(locked / "x.wav")))


class _StrictArgs(TypedDict):
    text: str
    output_path: str
    strict_capabilities: bool


async def test_voices_and_unsupported_controls(
    backend: PiperBackend, model: ModelSchema, tmp_path: Path
) -> None:
    out = str(tmp_path / "v.wav")
    own = await backend.synthesize(model, SynthesizeRequest(text="Hi.", voice="joe", output_path=out))
    assert own.voice_used == "en_US-joe-medium"
    # A voice the model does not have is an error listing its voices, strict or not: never
    # silently another voice (an OpenAI client's "alloy" included).
    for voice in ("alloy", "nosuch"):
        with pytest.raises(InvalidInput, match=rf"has no voice '{voice}'; its voices: en_US-joe-medium"):
            await backend.synthesize(model, SynthesizeRequest(text="Hi.", voice=voice, output_path=out))
    strict: _StrictArgs = {"text": "Hi.", "output_path": out, "strict_capabilities": True}
    with pytest.raises(InvalidInput, match="does not support voice_instruction"):
        await backend.synthesize(model, SynthesizeRequest(**strict, voice_instruction="whisper it"))
    with pytest.raises(InvalidInput, match="speaks en-us, not fr"):
        await backend.synthesize(model, SynthesizeRequest(**strict, language="fr"))
    await backend.synthesize(model, SynthesizeRequest(**strict, language="en-US"))
    loose = await backend.synthesize(
        model, SynthesizeRequest(text="Hi.", output_path=out, voice_instruction="whisper it", language="fr")
    )
    assert loose.audio_path == out


async def test_voice_names_mapped_in_config(model: ModelSchema, tmp_path: Path) -> None:
    config = CarConfig(
        home=tmp_path, speech=SpeechSettings(voices={"alloy": "en_US-joe-medium", "echo": "nobody"})
    )
    mapped = PiperBackend(BackendContext(config=config, cache=ModelCache(config.local.cache_mb)))
    out = str(tmp_path / "v.wav")
    alloy = await mapped.synthesize(model, SynthesizeRequest(text="Hi.", voice="alloy", output_path=out))
    assert alloy.voice_used == "en_US-joe-medium"
    mapped_wrong = (
        r"no voice 'echo'; its voices: en_US-joe-medium \(mapped to 'nobody' by \[speech\] voices\)$"
    )
    with pytest.raises(InvalidInput, match=mapped_wrong):
        await mapped.synthesize(model, SynthesizeRequest(text="Hi.", voice="echo", output_path=out))


async def test_voices_are_listed_from_the_config_without_loading(model: ModelSchema, tmp_path: Path) -> None:
    """--list-voices on Piper: the voice's own name, the default, and only the [speech] voices
    entries that reach it (a mapping to a voice it lacks is not listed as working)."""
    config = CarConfig(
        home=tmp_path, speech=SpeechSettings(voices={"alloy": "en_US-joe-medium", "echo": "nobody"})
    )
    cache = ModelCache(config.local.cache_mb)
    listed = await PiperBackend(BackendContext(config=config, cache=cache)).voices(model)
    assert (listed.model, listed.ids(), listed.default) == (JOE, ["en_US-joe-medium"], "en_US-joe-medium")
    assert listed.aliases == {"alloy": "en_US-joe-medium"}
    assert cache.keys() == []  # read from the .onnx.json, the model was not loaded


async def test_a_multi_speaker_voice_lists_its_speakers(model: ModelSchema, tmp_path: Path) -> None:
    onnx = voice_file(model)
    config = json.loads(onnx.with_name(onnx.name + ".json").read_text())
    config.update(num_speakers=2, speaker_id_map={"amy": 0, "bob": 1})
    folder = tmp_path / "multi"
    folder.mkdir()
    (folder / "multi.onnx").symlink_to(onnx)
    (folder / "multi.onnx.json").write_text(json.dumps(config))
    multi = model.model_copy(
        update={"id": "piper/multi", "name": "multi", "source": PiperSource(path=str(folder))}
    )
    settings = CarConfig(
        home=tmp_path, speech=SpeechSettings(voices={"nova": "bob", "alloy": "en_US-joe-medium"})
    )
    listed = await PiperBackend(BackendContext(config=settings, cache=ModelCache(100))).voices(multi)
    assert (listed.ids(), listed.default, listed.aliases) == (["amy", "bob"], "amy", {"nova": "bob"})


async def test_a_caller_that_stops_waiting_stops_the_synthesis(
    backend: PiperBackend, model: ModelSchema
) -> None:
    """Cancelled (a client that went away), a long synthesis stops at its next sentence and frees
    the voice, instead of speaking all 400 sentences (a minute or more here) for nobody."""
    backend.warm_up(model)
    request = SynthesizeRequest(text=" ".join([FOX] * 400))
    task = asyncio.create_task(backend.synthesize(model, request))
    await cancel_once_started(task, backend.ctx.cache.get(f"piper:{model.id}"), within_s=10)


async def test_a_long_synthesis_takes_turns_with_another_clients(
    backend: PiperBackend, model: ModelSchema
) -> None:
    """Client a's 30 sentences take a turn of the voice each; client b's one sentence, sent once
    a's has started, is spoken before a's is done (in one turn it waited for all 30)."""
    backend.warm_up(model)
    long = SynthesizeRequest(text=" ".join([FOX] * 30))
    finished = await finish_order(
        lambda: backend.ctx.cache.get(f"piper:{model.id}"),
        lambda: backend.synthesize(model, long),
        lambda: backend.synthesize(model, SynthesizeRequest(text=FOX)),
    )
    assert finished == ["b", "a"]


async def test_long_unpunctuated_text_is_spoken_in_bounded_memory(
    backend: PiperBackend, model: ModelSchema, tmp_path: Path
) -> None:
    """4,096 characters (the API's most) without . ! or ?: Piper took them for one sentence and
    spoke it in one run of its model, whose memory grows with its audio (3.4 GB for 1,000
    characters; 4,096 got the process killed at 24 GB). Cut in pieces, the peak grows ~0.4 GB."""
    await backend.synthesize(model, SynthesizeRequest(text=FOX, output_path=str(tmp_path / "warm.wav")))
    text = _unpunctuated(4096, ["hello", "world", "speech", "without", "an", "end"], " ")
    target = tmp_path / "long.wav"
    request = SynthesizeRequest(text=text, output_path=str(target))
    result, growth_mb = await _peak_rss_growth_mb(lambda: backend.synthesize(model, request))
    assert growth_mb < 1500
    assert result.audio_path == str(target) and target.read_bytes()[:4] == b"RIFF"
    assert len(text) / 30 < _wav_seconds(target) < len(text) / 10  # ~210 s: all of it is spoken


def test_sentences_that_fit_are_kept_and_an_overlong_one_is_cut_at_commas(
    backend: PiperBackend, model: ModelSchema
) -> None:
    """Piper gets the text as it was unless a sentence is too long for one run of its model: then
    each sentence on its own, the long one cut at the comma nearest its middle (then in halves)."""
    voice = backend._entry(model).instance
    fits = _fits(voice, None)
    assert list(_pieces(f"{FOX} {FOX}", fits)) == [f"{FOX} {FOX}"]
    pieces = list(_pieces(f"{FOX} {DICKENS} {FOX}", fits))
    assert len(pieces) == 4 and pieces[0] == FOX and pieces[-1] == FOX
    assert pieces[1].endswith(",") and " ".join(pieces[1:3]) == DICKENS
    # Slower speech is longer audio for the same text: shorter pieces.
    assert len(list(_pieces(DICKENS, _fits(voice, 0.25)))) > 2
    hard = _unpunctuated(600, "bcdfghjklmnpqrstvwxz0123456789")  # no space: cut hard, nothing lost
    cut = list(_pieces(hard, fits))
    assert len(cut) > 1 and "".join(cut) == hard and all(fits(p) for p in cut)


async def test_a_caller_that_stops_waiting_stops_unpunctuated_text_too(
    backend: PiperBackend, model: ModelSchema
) -> None:
    """The same for text without a sentence end (1,000 characters here, nearly 5 minutes of
    speech): Piper spoke it in one run that nothing could stop (~30 s here, 3.4 GB); in pieces,
    the synthesis stops at the end of the piece it is in."""
    backend.warm_up(model)
    request = SynthesizeRequest(text=_unpunctuated(1000, "bcdfghjklmnpqrstvwxz0123456789   "))
    task = asyncio.create_task(backend.synthesize(model, request))
    await cancel_once_started(task, backend.ctx.cache.get(f"piper:{model.id}"), within_s=10)
