"""The speech policy: which model listens or speaks when a request names none. Hosted models are
the catalog's OpenAI speech models on the fake provider server (a user ``[hosts.openai]``)."""

from __future__ import annotations

import asyncio
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from car_inference.engine import InferenceEngine
from car_inference.engine.speech import (
    speech_model,
    speech_smoke,
    transcription_cost,
    with_output_format,
    word_error_rate,
)
from car_inference.errors import (
    InferenceError,
    InvalidInput,
    ModelUnavailable,
    SpendLimitExceeded,
    UnsupportedMode,
)
from car_inference.requests import SynthesizeRequest, TranscribeRequest
from car_inference.schema import ModelCapability, WhisperSource
from fakes import FakeProviderServer
from fakes.provider_speech import spoken_text, wav

STT, TTS = ModelCapability.SPEECH_TO_TEXT, ModelCapability.TEXT_TO_SPEECH
WHISPER, PIPER = "systran/faster-whisper-base", "piper/en_us-joe-medium"
HOSTED_STT, HOSTED_TTS = "openai/gpt-transcribe", "openai/gpt-4o-mini-tts"


class BuildEngine(Protocol):
    """The ``engine_with`` fixture: an engine for these ``[speech]`` lines, with an OpenAI key or not."""

    def __call__(self, speech: str = "", key: bool = True, extra: str = "") -> InferenceEngine: ...


@pytest.fixture
def engine_with(
    fake: FakeProviderServer, isolated_home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[BuildEngine]:
    """An engine whose OpenAI host is the fake, with ``[speech]`` lines and an OpenAI key or not."""
    engines: list[InferenceEngine] = []

    def build(speech: str = "", key: bool = True, extra: str = "") -> InferenceEngine:
        (isolated_home / "models.toml").write_text(f'[hosts.openai]\nbase_url = "{fake.openai_base_url}"\n')
        (isolated_home / "config.toml").write_text(f"[speech]\n{speech}\n{extra}")
        if key:
            monkeypatch.setenv("OPENAI_API_KEY", "sk-speech-policy")
        else:
            monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        engines.append(InferenceEngine(home=isolated_home))
        return engines[-1]

    yield build
    for engine in engines:
        engine.close()


def chosen(engine: InferenceEngine, capability: ModelCapability) -> str:
    return speech_model(engine, None, capability).id


def test_local_speech_wins_by_default_even_with_a_key(engine_with: BuildEngine) -> None:
    engine = engine_with()
    hosted = engine.registry.get(HOSTED_TTS)
    assert hosted is not None and hosted.available  # the key makes it runnable...
    assert (chosen(engine, STT), chosen(engine, TTS)) == (WHISPER, PIPER)  # ...but local comes first


async def test_prefer_local_false_from_the_environment_runs_the_hosted_models(
    engine_with: BuildEngine, fake: FakeProviderServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CAR_SPEECH__PREFER_LOCAL", "false")
    engine = engine_with()
    spoken = await engine.synthesize(
        SynthesizeRequest(text="hosted first", output_path=str(tmp_path / "a.wav"))
    )
    heard = await engine.transcribe(TranscribeRequest(audio_path=spoken.audio_path))
    assert (spoken.model_used, heard.model_used, heard.text) == (HOSTED_TTS, HOSTED_STT, "hosted first")
    assert [r.path for r in fake.requests] == ["/v1/audio/speech", "/v1/audio/transcriptions"]
    assert spoken_text(Path(spoken.audio_path).read_bytes()) == "hosted first"


def test_prefer_local_false_without_a_key_stays_local(engine_with: BuildEngine) -> None:
    engine = engine_with("prefer_local = false", key=False)
    assert (chosen(engine, STT), chosen(engine, TTS)) == (WHISPER, PIPER)


def test_each_side_has_its_preferred_model(engine_with: BuildEngine, fake: FakeProviderServer) -> None:
    engine = engine_with('prefer_local = false\npreferred_remote_tts = "studio/tts-1"')
    studio = engine.register_endpoint(fake.openai_base_url, "tts-1", name="studio")
    engine.register_model(studio.model_copy(update={"capabilities": [TTS], "quality": 0.1}))
    assert chosen(engine, TTS) == "studio/tts-1"  # over the better-rated gpt-4o-mini-tts
    # A local preference does not pull a hosted model first, nor the other way round.
    engine = engine_with(f'preferred_remote_tts = "{HOSTED_TTS}"\npreferred_local_stt = "{WHISPER}"')
    assert (chosen(engine, STT), chosen(engine, TTS)) == (WHISPER, PIPER)


def test_a_pinned_model_and_a_named_model_win(engine_with: BuildEngine) -> None:
    engine = engine_with(extra=f'[preferred]\ntext_to_speech = "{HOSTED_TTS}"\n')
    assert chosen(engine, TTS) == HOSTED_TTS
    assert speech_model(engine, PIPER, TTS).id == PIPER


def without_local_stt(engine: InferenceEngine, tmp_path: Path) -> None:
    """Whisper's files made to be missing, so no local speech-to-text model is available."""
    whisper = engine.registry.get(WHISPER)
    assert whisper is not None
    source = WhisperSource(path=str(tmp_path / "no-such-model"))
    assert not engine.register_model(whisper.model_copy(update={"source": source})).available


def test_with_no_local_model_a_hosted_one_steps_in(engine_with: BuildEngine, tmp_path: Path) -> None:
    engine = engine_with()
    without_local_stt(engine, tmp_path)
    assert chosen(engine, STT) == HOSTED_STT


async def test_no_remote_fallback_keeps_hosted_models_out(engine_with: BuildEngine, tmp_path: Path) -> None:
    engine = engine_with("allow_remote_fallback = false")
    without_local_stt(engine, tmp_path)
    assert chosen(engine, STT) == WHISPER  # the configured default: its run says what is missing
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"RIFF")  # a file that is there: the model, not the file, is what is missing
    with pytest.raises(ModelUnavailable, match=WHISPER):
        await engine.transcribe(TranscribeRequest(audio_path=str(audio)))


def test_a_preferred_name_not_in_the_catalog_is_an_error(engine_with: BuildEngine) -> None:
    engine = engine_with('preferred_local_tts = "piper/en_us-joe-medum"')
    with pytest.raises(InferenceError, match="en_us-joe-medum") as info:
        chosen(engine, TTS)
    assert "en_us-joe-medium" in str(info.value)  # the close match is suggested


# --- health ------------------------------------------------------------------------------------


def test_speech_health_says_what_each_direction_runs(engine_with: BuildEngine, tmp_path: Path) -> None:
    engine = engine_with(f'preferred_remote_tts = "{HOSTED_TTS}"\nvoices = {{ alloy = "en_US-joe-medium" }}')
    speech = engine.model_health().speech
    assert (speech.stt_model, speech.tts_model) == (WHISPER, PIPER) and speech.stt_available
    assert (speech.local_stt_default, speech.local_tts_default) == (WHISPER, PIPER)
    assert (speech.remote_stt_default, speech.remote_tts_default) == (HOSTED_STT, HOSTED_TTS)
    assert speech.preferred_remote_tts == HOSTED_TTS and speech.voices == {"alloy": "en_US-joe-medium"}
    selected = {m.id for m in speech.local_models + speech.remote_models if m.selected_by_default}
    assert selected == {WHISPER, PIPER, HOSTED_STT, HOSTED_TTS} and not speech.problems
    # Hosted first by policy; then with no local speech-to-text and no fallback allowed.
    engine.config.speech.prefer_local = False
    assert (engine.model_health().speech.stt_model, speech.remote_stt_default) == (HOSTED_STT, HOSTED_STT)
    engine.config.speech.prefer_local = True
    engine.config.speech.allow_remote_fallback = False
    without_local_stt(engine, tmp_path)
    speech = engine.model_health().speech
    assert (speech.stt_model, speech.stt_available, speech.local_stt_default) == (WHISPER, False, None)
    assert any(
        p.startswith(f"speech_to_text: {WHISPER} is the model it would use, but it cannot run here")
        for p in speech.problems
    )


def test_speech_health_lists_a_misconfiguration_instead_of_failing(engine_with: BuildEngine) -> None:
    speech = engine_with('preferred_local_tts = "piper/en_us-joe-medum"', key=False).model_health().speech
    assert speech.tts_model is None and speech.local_tts_default is None and speech.remote_tts_default is None
    assert speech.stt_model == WHISPER  # the other direction is unaffected
    assert any("text_to_speech (local)" in p and "en_us-joe-medum" in p for p in speech.problems)


async def test_list_voices_follows_the_speech_policy(engine_with: BuildEngine) -> None:
    engine = engine_with('voices = { alloy = "en_US-joe-medium" }')
    local = await engine.list_voices()
    assert (local.model, local.ids(), local.aliases) == (
        PIPER,
        ["en_US-joe-medium"],
        {"alloy": "en_US-joe-medium"},
    )
    engine.config.speech.prefer_local = False
    hosted = await engine.list_voices()
    assert hosted.model == HOSTED_TTS and hosted.default == "alloy" and hosted.aliases == {}
    with pytest.raises(UnsupportedMode, match="does not declare text_to_speech"):
        await engine.list_voices(WHISPER)


# --- the smoke test ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("said", "heard", "rate"),
    [
        ("The quick brown fox.", "the quick brown fox", 0.0),  # case and punctuation do not count
        ("the quick brown fox", "the quack brown fox", 0.25),  # one substitution
        ("the quick brown fox", "the brown fox", 0.25),  # one deletion
        ("the quick brown fox", "the quick brown fox jumps over", 0.5),  # two insertions
        ("one two", "", 1.0),
        ("", "", 0.0),
    ],
)
def test_word_error_rate(said: str, heard: str, rate: float) -> None:
    assert word_error_rate(said, heard) == pytest.approx(rate)


async def test_the_smoke_test_runs_each_side_asked_for(
    engine_with: BuildEngine, fake: FakeProviderServer
) -> None:
    engine = engine_with()
    before = set(Path(tempfile.gettempdir()).glob("car-smoke-*"))
    report = await speech_smoke(engine, local=False, remote=True, text="Testing the remote path.")
    assert report.skipped == ["local"]
    (path,) = report.paths
    assert (path.side, path.tts_model, path.stt_model) == ("remote", HOSTED_TTS, HOSTED_STT)
    assert (path.transcript, path.word_error_rate) == ("Testing the remote path.", 0.0)
    assert path.audio_s == pytest.approx(0.3 * 4) and path.synthesize_ms > 0 and path.transcribe_ms > 0
    assert path.audio_path is None  # not kept: its folder is gone
    assert set(Path(tempfile.gettempdir()).glob("car-smoke-*")) == before
    fake.speech.heard = "testing the remote bath"
    report = await speech_smoke(engine, local=False, remote=True, text="Testing the remote path.")
    assert report.paths[0].word_error_rate == pytest.approx(0.25)


async def test_a_smoke_side_without_models_says_so(engine_with: BuildEngine) -> None:
    engine = engine_with(key=False)
    with pytest.raises(ModelUnavailable, match=r"no remote text_to_speech model can run here: .*_API_KEY"):
        await speech_smoke(engine, local=False, remote=True)


# --- spend ---------------------------------------------------------------------------------------


async def test_hosted_speech_counts_against_spend_limits(
    engine_with: BuildEngine, fake: FakeProviderServer, tmp_path: Path
) -> None:
    engine = engine_with(extra="[spend]\ndaily_usd = 0.02\n")
    text = "x" * 1000  # $0.015 at gpt-4o-mini-tts's $0.015 per 1k characters
    spoken = await engine.synthesize(
        SynthesizeRequest(text=text, model=HOSTED_TTS, output_path=str(tmp_path / "a.wav"))
    )
    assert engine.spend.status().by_provider_today == {"openai": pytest.approx(0.015)}
    with pytest.raises(SpendLimitExceeded):
        await engine.synthesize(SynthesizeRequest(text=text, model=HOSTED_TTS))
    assert len(fake.requests) == 1  # refused before the call
    # Transcription is priced per minute of audio: the fake's WAV is 0.3 s per word.
    audio = tmp_path / "long.wav"
    audio.write_bytes(wav(" ".join(["word"] * 200)))  # 60 s: $0.0045
    await engine.transcribe(TranscribeRequest(audio_path=str(audio), model=HOSTED_STT))
    assert engine.spend.status().by_provider_today == {"openai": pytest.approx(0.0195)}
    # Local speech costs nothing and is never refused, even over the limit.
    engine.spend.record("openai", HOSTED_TTS, 1.0)
    local = await engine.synthesize(SynthesizeRequest(text="free", output_path=str(tmp_path / "b.wav")))
    assert (spoken.model_used, local.model_used) == (HOSTED_TTS, PIPER)


async def test_hosted_first_speech_over_its_limit_runs_locally_unless_named(
    engine_with: BuildEngine, fake: FakeProviderServer, tmp_path: Path
) -> None:
    """Every request naming no model was refused while the free local models could answer."""
    engine = engine_with("prefer_local = false", extra="[spend]\ndaily_usd = 0.001\n")
    engine.spend.record("openai", HOSTED_TTS, 0.002)
    spoken = await engine.synthesize(SynthesizeRequest(text="Hi there.", output_path=str(tmp_path / "a.wav")))
    assert spoken.model_used == PIPER
    heard = await engine.transcribe(TranscribeRequest(audio_path=spoken.audio_path))
    assert heard.model_used == WHISPER and not fake.requests
    with pytest.raises(SpendLimitExceeded):  # a named model is never replaced
        await engine.synthesize(SynthesizeRequest(text="Hi there.", model=HOSTED_TTS))


def test_a_preferred_model_of_the_other_side_is_an_error(engine_with: BuildEngine) -> None:
    """It was passed over without a word; health lists it even where that side is not used now."""
    engine = engine_with(f'preferred_local_tts = "{HOSTED_TTS}"')
    with pytest.raises(InferenceError, match=r"preferred_local_tts = '.*' is a hosted model"):
        chosen(engine, TTS)
    hosted_first = engine_with(f'prefer_local = false\npreferred_local_tts = "{HOSTED_TTS}"')
    assert any("preferred_local_tts" in p for p in hosted_first.model_health().speech.problems)


def test_a_preferred_model_that_cannot_do_the_direction_is_an_error(engine_with: BuildEngine) -> None:
    """A voice named as the preferred speech-to-text model was passed over just as silently."""
    engine = engine_with(f'preferred_local_stt = "{PIPER}"')
    with pytest.raises(InferenceError, match=r"preferred_local_stt = '.*' cannot do speech_to_text"):
        chosen(engine, STT)
    assert chosen(engine, TTS) == PIPER  # the other direction is unaffected
    speech = engine.model_health().speech
    assert any("cannot do speech_to_text (it does text_to_speech)" in p for p in speech.problems)


def test_health_names_a_voice_alias_that_matches_no_voice(engine_with: BuildEngine) -> None:
    """Every request naming the alias failed, and nothing said so before one did."""
    mapped = engine_with('voices = { alloy = "en_US-joe-medium", echo = "en_US-joe-medum", nova = "0" }')
    problems = mapped.model_health().speech.problems
    assert problems == [
        "[speech] voices: echo -> 'en_US-joe-medum' is no local voice (voices: en_US-joe-medium)",
        "[speech] voices: nova -> '0' is no local voice (voices: en_US-joe-medium)",  # one speaker
    ]


async def test_hosted_speech_calls_at_once_cannot_all_pass_a_limit(
    engine_with: BuildEngine, fake: FakeProviderServer
) -> None:
    """Speech and media checked the limit without holding the estimate: calls at once each passed
    a check that one of them fitted in (generation holds it; now these do too)."""
    engine = engine_with(extra="[spend]\ndaily_usd = 0.02\n")
    text = "x" * 1000  # $0.015 each
    outcomes = await asyncio.gather(
        *(engine.synthesize(SynthesizeRequest(text=text, model=HOSTED_TTS)) for _ in range(3)),
        return_exceptions=True,
    )
    assert sum(isinstance(o, SpendLimitExceeded) for o in outcomes) == 2, outcomes
    assert len(fake.requests) == 1
    assert engine.spend.status().by_provider_today == {"openai": pytest.approx(0.015)}


def test_the_cost_of_audio_of_unknown_length_is_none(tmp_path: Path, engine_with: BuildEngine) -> None:
    engine = engine_with()
    hosted, local = engine.registry.get(HOSTED_STT), engine.registry.get(WHISPER)
    assert hosted is not None and local is not None
    clip = tmp_path / "a.wav"
    clip.write_bytes(wav("one two three four"))  # 1.2 s
    assert transcription_cost(hosted, str(clip)) == pytest.approx(0.0045 * 1.2 / 60)
    assert transcription_cost(local, str(clip)) == 0.0
    notes = tmp_path / "a.txt"
    notes.write_text("not audio")
    assert transcription_cost(hosted, str(notes)) is None
    # What a WAV written to a pipe says (RIFF and data sizes 0xFFFFFFFF): 27 hours, $7.31 for 1.2 s.
    piped = tmp_path / "piped.wav"
    data = bytearray(clip.read_bytes())
    at = data.index(b"data") + 4
    data[4:8] = data[at : at + 4] = struct.pack("<I", 0xFFFFFFFF)
    piped.write_bytes(bytes(data))
    assert transcription_cost(hosted, str(piped)) == pytest.approx(0.0045 * 1.2 / 60, rel=0.01)
    rate0 = tmp_path / "rate0.wav"  # a header that says 0 Hz: a ZeroDivisionError (a 500)
    rate0.write_bytes(bytes(data[:24]) + struct.pack("<I", 0) + bytes(data[28:]))
    assert transcription_cost(hosted, str(rate0)) is None
    cut = tmp_path / "cut.ogg"  # PyAV's EOFError, which click took for Ctrl-D ("aborted")
    cut.write_bytes(b"OggS")
    assert transcription_cost(hosted, str(cut)) is None


def test_an_output_name_gives_the_format_left_out() -> None:
    """``hello.mp3`` with no format was WAV data under an mp3 name."""
    as_named = with_output_format(SynthesizeRequest(text="Hi.", output_path="/tmp/hello.mp3"))
    assert as_named.format == "mp3"
    assert with_output_format(SynthesizeRequest(text="Hi.", output_path="/tmp/a.raw")).format == "pcm"
    assert with_output_format(SynthesizeRequest(text="Hi.", output_path="/tmp/a.ogg")).format == "wav"
    assert (
        with_output_format(SynthesizeRequest(text="Hi.", output_path="/tmp/a.wav", format="wav")).format
        == "wav"
    )
    with pytest.raises(InvalidInput, match=r"names a \.mp3 file but format is 'flac'"):
        with_output_format(SynthesizeRequest(text="Hi.", output_path="/tmp/a.mp3", format="flac"))
