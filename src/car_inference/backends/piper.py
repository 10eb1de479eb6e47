"""Piper text-to-speech in-process: an ONNX voice from an installed package, a path or a pulled file.

A voice is an ``.onnx`` model with its ``.onnx.json`` config beside it. Audio comes out as 16-bit
mono PCM at the voice's sample rate: written as WAV with the standard library, or encoded to
MP3/FLAC with PyAV (which the ``speech`` extra installs; faster-whisper needs it too). Raw PCM,
which has no header to say its rate, is resampled to 24 kHz, the rate OpenAI's and ElevenLabs'
``pcm`` have (``PCM_RATE``): a client written for them played Piper's 22,050 Hz 9 % fast.
Files are written under a temporary name beside their target and renamed into place, so nobody
ever reads half a file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import threading
import wave
from collections.abc import Callable, Iterable, Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO

from ..catalog.locate import local_path
from ..errors import InferenceError, InferenceFailed, InvalidInput, UnsupportedMode
from ..requests import SynthesizeRequest, SynthesizeResult
from ..schema import ModelSchema, PiperSource
from .base import BackendContext, run_blocking, run_stoppable, until_stopped
from .cache import CachedModel
from .fair import step_by_step
from .media_files import atomic_file, output_path
from .voices import Voice, VoiceList, aliases_for

__all__ = ["MEDIA_TYPES", "PCM_RATE", "PiperBackend", "resampled", "unmatched_voice_aliases", "write_audio"]

log = logging.getLogger(__name__)

MEDIA_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "flac": "audio/flac"}
PCM_RATE = 24_000  # raw pcm output, 16-bit mono little-endian, as OpenAI's and ElevenLabs' pcm
_ENCODERS = {"mp3": "libmp3lame", "flac": "flac"}
# The most phoneme ids Piper gets in one run of its model (at normal speed; proportionally fewer
# slower): a run's memory grows with its audio, ~20 MB a second of speech. 800 ids are ~330
# characters of English, ~16 s of speech: a longer sentence is cut, and a request's peak grows by
# 0.25-0.65 GB whatever its text (measured on 1,000-4,096 characters without a sentence end).
_MAX_IDS = 800
# Where a text too long for one run is cut: at the end of each sentence, else at a , ; : or line
# break near the middle of the sentence, else at the space nearest it (a hard cut where none).
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*\s+")
_CLAUSE_END = re.compile(r"[,;:][\"'”’)\]]*\s+|\n\s*")
_SPACE = re.compile(r"\s+")


class PiperBackend:
    kind = "piper"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    def _entry(self, model: ModelSchema) -> CachedModel:
        onnx = voice_file(model)
        config = onnx.with_name(onnx.name + ".json")
        if not config.is_file():
            raise InferenceFailed(f"{model.id}: the voice config {config.name} is missing beside {onnx}")
        size = model.cost.size_mb or onnx.stat().st_size / 1e6

        def load() -> Any:
            from piper import PiperVoice

            try:
                return PiperVoice.load(onnx, config_path=config, use_cuda=False)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise InferenceFailed(f"could not load {model.id} from {onnx}: {exc}") from exc

        return self.ctx.cache.get_or_load(f"piper:{model.id}", size, load)

    def warm_up(self, model: ModelSchema) -> None:
        self._entry(model)

    async def synthesize(self, model: ModelSchema, request: SynthesizeRequest) -> SynthesizeResult:
        text = request.text.strip()
        if not text:
            raise InvalidInput(f"{model.id}: nothing to synthesize: the text is empty")
        fmt = request.format
        if fmt in _ENCODERS and not _have_pyav():
            hint = "encoding needs PyAV: pip install 'car-inference[speech]'"
            raise UnsupportedMode(f"synthesize format {fmt}", "piper", hint)
        _check_unsupported_controls(model, request)
        target = output_path(request.output_path, fmt, "car-tts-")
        voice_names = self.ctx.config.speech.voices

        def work(stop: threading.Event) -> SynthesizeResult:
            from piper import SynthesisConfig

            entry = self._entry(model)
            voice = entry.instance
            speaker_id, voice_used = _speaker(model, voice.config, request.voice, voice_names)
            _check_language(model, voice.config, request)
            config = SynthesisConfig(
                speaker_id=speaker_id,
                # Piper's length_scale is seconds per phoneme relative to normal: 2x speed = 0.5.
                length_scale=voice.config.length_scale / request.speed if request.speed else None,
            )
            with entry.lock:
                pieces = _pieces(text, _fits(voice, request.speed))
            # a sentence a step and a turn on the voice
            chunks = (chunk for piece in pieces for chunk in voice.synthesize(piece, config))
            pcm = _sentences(model, step_by_step(chunks, entry.lock), stop)
            if not pcm:
                raise InvalidInput(f"{model.id}: the text has nothing to pronounce: {text[:60]!r}")
            write_audio(target, pcm, voice.config.sample_rate, fmt)
            return SynthesizeResult(
                audio_path=str(target),
                media_type=MEDIA_TYPES[fmt],
                model_used=model.id,
                voice_used=voice_used,
            )

        def work_or_clean(stop: threading.Event) -> SynthesizeResult:
            try:
                return work(stop)
            except BaseException:
                if not request.output_path:  # our temporary file: nobody will read it
                    target.unlink(missing_ok=True)
                raise

        return await run_stoppable(work_or_clean)

    async def voices(self, model: ModelSchema) -> VoiceList:
        """The speakers of a multi-speaker voice, else the voice itself (by name); read from the
        voice's config, without loading the model."""
        mapping = self.ctx.config.speech.voices

        def read() -> VoiceList:
            onnx = voice_file(model)
            config_path = onnx.with_name(onnx.name + ".json")
            try:
                config = json.loads(config_path.read_text())
            except (OSError, ValueError) as exc:
                raise InferenceFailed(
                    f"{model.id}: cannot read the voice config {config_path}: {exc}"
                ) from exc
            speakers: dict[str, int] = dict(config.get("speaker_id_map") or {})
            if int(config.get("num_speakers") or 1) > 1 and speakers:
                default_id = int(config.get("default_speaker_id") or 0)
                default = next((n for n, i in speakers.items() if i == default_id), None)
                names = sorted(speakers)
                aliases = aliases_for(mapping, names)
            else:
                default, names = model.name, [model.name]
                own = _own_names(model)
                aliases = {a: model.name for a, target in sorted(mapping.items()) if target.lower() in own}
            return VoiceList(
                model=model.id, voices=[Voice(id=n) for n in names], default=default, aliases=aliases
            )

        return await run_blocking(read)


def _sentences(model: ModelSchema, chunks: Iterable[Any], stop: threading.Event) -> bytes:
    """The PCM of Piper's chunks (one a sentence), read until ``stop`` is set: a caller that went
    away stops the synthesis at the next sentence instead of holding the voice for all of them."""
    pcm = []
    try:
        for chunk in until_stopped(chunks, stop, f"{model.id}: synthesis"):
            pcm.append(chunk.audio_int16_bytes)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise InferenceFailed(f"{model.id} could not synthesize the text: {exc}") from exc
    return b"".join(pcm)


def _fits(voice: Any, speed: float | None) -> Callable[[str], bool]:
    """Whether Piper can speak a text's every sentence in one bounded run of its model: at most
    ``_MAX_IDS`` phoneme ids, fewer at a slower speed (a run's memory grows with its audio)."""
    most = _MAX_IDS * min(1.0, speed or 1.0)

    def fits(text: str) -> bool:
        return all(len(voice.phonemes_to_ids(s)) <= most for s in voice.phonemize(text))

    return fits


def _pieces(text: str, fits: Callable[[str], bool]) -> Iterator[str]:
    """``text`` in the order spoken, in pieces that ``fits``: its sentences, an overlong one cut in
    halves (``_halves``) until they fit. Piper speaks a text without . ! or ? as one sentence in
    one run of its model, which cannot be stopped and takes memory without bound: 2.8 GB for 500
    characters of unpunctuated text, 3.4 GB for 1,000, and 4,096 (a legal request) got the server
    killed at 24 GB. Text whose sentences all fit is one piece, as Piper had it before."""
    if len(text) < 2 or fits(text):
        yield text
        return
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    parts = [text[a:b].strip() for a, b in zip([0, *ends], [*ends, len(text)], strict=True)]
    for part in parts if len(parts) > 1 else _halves(text):
        yield from _pieces(part, fits)


def _halves(text: str) -> list[str]:
    """One overlong sentence in two: at the , ; : or line break nearest its middle (in its middle
    half), else at the space nearest it, else (one long word) at the middle."""
    middle = len(text) // 2
    clauses = [m.end() for m in _CLAUSE_END.finditer(text) if abs(m.end() - middle) <= len(text) // 4]
    spaces = [m.start() for m in _SPACE.finditer(text)]
    at = min(clauses or spaces or [middle], key=lambda i: abs(i - middle))
    return [text[:at].strip(), text[at:].strip()]


def voice_file(model: ModelSchema) -> Path:
    """The voice's ``.onnx`` file: the located path itself, or the one in the located folder."""
    found = local_path(model)
    if found.is_file():
        return found
    source = model.source
    named = getattr(source, "filename", None) if isinstance(source, PiperSource) else None
    if named and (found / named).is_file():
        return found / named
    candidates = sorted(found.glob("*.onnx"))
    if len(candidates) != 1:
        what = "no" if not candidates else f"{len(candidates)}"
        raise InferenceFailed(f"{model.id}: {what} .onnx voices in {found}; set `resource` or `filename`")
    return candidates[0]


def _speaker(
    model: ModelSchema, config: Any, requested: str | None, voice_names: dict[str, str]
) -> tuple[int | None, str]:
    """Speaker id and name for the ``requested`` voice (None: the default). A name the voice does
    not have is ``InvalidInput`` listing the ones it has, never silently another voice; other
    names (an OpenAI client's "alloy") work when ``[speech] voices`` maps them to one of them."""
    speakers: dict[str, int] = dict(config.speaker_id_map or {})
    multi = config.num_speakers > 1 and bool(speakers)
    if requested is None:
        if not multi:
            return None, model.name
        default = int(getattr(config, "default_speaker_id", 0))
        return default, next((n for n, i in speakers.items() if i == default), str(default))
    wanted = voice_names.get(requested, requested)
    if multi and wanted in speakers:
        return speakers[wanted], wanted
    if multi and wanted.isdigit() and int(wanted) < config.num_speakers:
        return int(wanted), wanted
    if not multi and wanted.lower() in _own_names(model):
        return None, model.name
    names = sorted(speakers) if multi else [model.name]
    if wanted != requested:
        hint = f" (mapped to {wanted!r} by [speech] voices)"
    else:  # how to make this name work
        mapping = f'{{ {_toml_key(requested)} = "{names[0]}" }}'
        hint = f". To accept another name, map it in config.toml: [speech] voices = {mapping}"
    raise InvalidInput(
        f"{model.id} has no voice {requested!r}; its voices: {', '.join(names)}{hint}", param="voice"
    )


def _toml_key(name: str) -> str:
    return name if name.replace("_", "").replace("-", "").isalnum() else json.dumps(name)


def _check_language(model: ModelSchema, config: Any, request: SynthesizeRequest) -> None:
    """A voice speaks one language: another one is an error when strict, else a warning."""
    if not request.language:
        return
    wanted = request.language.lower().replace("_", "-").split("-")[0]
    spoken = str(config.espeak_voice or "").lower().split("-")[0]
    if not spoken or wanted == spoken:
        return
    if request.strict_capabilities:
        raise InvalidInput(f"{model.id} speaks {config.espeak_voice}, not {request.language}")
    log.warning("%s speaks %s, not %s", model.id, config.espeak_voice, request.language)


def unmatched_voice_aliases(mapping: dict[str, str], models: Iterable[ModelSchema]) -> list[str]:
    """``[speech] voices`` entries whose target is no Piper voice of the catalog (by name or alias)
    nor a speaker of an installed multi-speaker voice: every request naming the alias fails, and
    only ``car health`` can say so before one does."""
    if not mapping:
        return []
    voices = [m for m in models if m.source.kind == PiperBackend.kind]
    known: set[str] = set().union(*(_own_names(m) for m in voices)) if voices else set()
    for model in voices:
        with contextlib.suppress(InferenceError, OSError, ValueError, AttributeError):
            onnx = voice_file(model)  # installed voices only; others have no speakers to read
            config = json.loads(onnx.with_name(onnx.name + ".json").read_text())
            speakers = config.get("speaker_id_map") or {}
            known.update(str(name).lower() for name in speakers)
            known.update(str(n) for n in range(int(config.get("num_speakers") or 1)) if speakers)
    names = sorted(m.name for m in voices) or ["none installed"]
    return [
        f"[speech] voices: {alias} -> {target!r} is no local voice (voices: {', '.join(names)})"
        for alias, target in sorted(mapping.items())
        if target.lower() not in known
    ]


def _own_names(model: ModelSchema) -> set[str]:
    return {model.id.lower(), model.id.split("/")[-1].lower(), model.name.lower()} | {
        a.lower() for a in model.aliases
    }


def _check_unsupported_controls(model: ModelSchema, request: SynthesizeRequest) -> None:
    """Voice cloning and voice instructions are not Piper features: an error when the request is
    strict, otherwise synthesized without them (as the seed does for non-Qwen3-TTS backends)."""
    requested = [
        name
        for name in ("reference_audio_path", "reference_text", "voice_instruction")
        if getattr(request, name)
    ]
    if not requested:
        return
    if request.strict_capabilities:
        raise InvalidInput(
            f"{model.id} (piper) does not support {', '.join(requested)}; "
            "use a model that does or set strict_capabilities = false"
        )
    log.warning("%s (piper) ignores %s", model.id, ", ".join(requested))


def write_audio(target: Path, pcm: bytes, sample_rate: int, fmt: str) -> None:
    """Write 16-bit mono ``pcm`` to ``target`` as ``fmt``, atomically (``media_files.atomic_file``).
    Compressed formats are encoded in memory first: PyAV writing to the file itself printed its
    own traceback when the disk was full."""
    if fmt not in ("wav", "pcm"):
        encoded = io.BytesIO()
        try:
            _encode(encoded, pcm, sample_rate, fmt)
        except (OSError, ValueError) as exc:  # PyAV's errors derive from both
            raise InferenceFailed(f"cannot encode audio as {fmt}: {exc}") from exc
    with atomic_file(target, what="audio to ") as file:
        if fmt == "wav":
            with wave.open(file, "wb") as wav:
                wav.setnchannels(1)
                wav.setsampwidth(2)
                wav.setframerate(sample_rate)
                wav.writeframes(pcm)
        elif fmt == "pcm":
            file.write(resampled(pcm, sample_rate, PCM_RATE))
        else:
            file.write(encoded.getvalue())


def resampled(pcm: bytes, rate: int, target: int) -> bytes:
    """16-bit mono ``pcm`` at ``rate`` as the same at ``target`` (linear interpolation: for speech
    between 16 and 24 kHz, inaudibly different from a polyphase filter, and numpy only)."""
    if rate == target or not pcm:
        return pcm
    import numpy as np

    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    count = round(len(samples) * target / rate)
    at = np.arange(count) * (rate / target)
    out = np.interp(at, np.arange(len(samples)), samples)
    return np.clip(np.rint(out), -32768, 32767).astype("<i2").tobytes()


def _encode(file: BinaryIO, pcm: bytes, sample_rate: int, fmt: str) -> None:
    import av
    import numpy as np

    samples = np.frombuffer(pcm, dtype=np.int16).reshape(1, -1)
    with av.open(file, mode="w", format=fmt) as container:
        stream: Any = container.add_stream(_ENCODERS[fmt], rate=sample_rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = sample_rate
        frame.pts, frame.time_base = 0, Fraction(1, sample_rate)  # else PyAV 12 guesses, noisily
        for packet in (*stream.encode(frame), *stream.encode(None)):
            container.mux(packet)


def _have_pyav() -> bool:
    from . import _importable

    return _importable("av")
