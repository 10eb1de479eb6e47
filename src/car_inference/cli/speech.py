"""`car transcribe` and `car speak`: speech to text and text to speech; `car speech smoke`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..engine.speech import AUDIO_SUFFIXES
from ..requests import SynthesizeRequest, TranscribedSegment, TranscribeRequest
from .common import (
    EXIT_USAGE,
    JsonOpt,
    ModelOpt,
    engine,
    err,
    fail,
    handle_errors,
    out,
    print_json,
    run,
    spinner,
)

FORMATS = ("wav", "mp3", "flac", "pcm")


def register(app: typer.Typer) -> None:
    app.add_typer(speech_app, name="speech")

    @app.command()
    @handle_errors
    def transcribe(
        audio: Annotated[Path, typer.Argument(help="audio file (wav, mp3, flac, ogg, m4a...)")],
        model: ModelOpt = None,
        language: Annotated[
            str | None, typer.Option("--language", "-l", help="spoken language, e.g. en (default: detect)")
        ] = None,
        prompt: Annotated[
            str | None, typer.Option("--prompt", help="text that came before: names, spellings, style")
        ] = None,
        timestamps: Annotated[bool, typer.Option("--timestamps", help="word start and end times")] = False,
        as_json: JsonOpt = False,
    ) -> None:
        """Transcribe speech in an audio file to text."""
        request = TranscribeRequest(
            audio_path=str(audio), model=model, language=language, prompt=prompt, timestamps=timestamps
        )
        # In a terminal the text comes as Whisper decodes it, a 30-second window at a time (as
        # `car generate` streams); piped, it is the result's text, whole.
        live = out.is_terminal and not (as_json or timestamps)
        shown: list[str] = []

        def heard(segment: TranscribedSegment) -> None:
            if segment.text:
                out.print(("" if not shown else " ") + segment.text, end="", markup=False)
                shown.append(segment.text)

        with spinner("Transcribing...", enabled=not live):
            result = run(engine().transcribe(request, on_segment=heard if live else None))
        if as_json:
            print_json(result)
            return
        if timestamps:
            for word in result.words:
                out.print(f"{word.start:8.2f} {word.end:8.2f}  {word.word}", markup=False)
        else:
            out.print("" if shown else result.text, markup=False)  # a hosted model's comes whole
        err.print(f"{result.model_used} ({result.language or 'unknown language'})", style="dim")

    @app.command()
    @handle_errors
    def speak(
        text: Annotated[str | None, typer.Argument(help="the text to say")] = None,
        output: Annotated[
            Path | None,
            typer.Option("--output", "-o", help="audio file to write (default: a new temporary file)"),
        ] = None,
        model: ModelOpt = None,
        voice: Annotated[
            str | None, typer.Option("--voice", help="voice or speaker name (--list-voices shows them)")
        ] = None,
        list_voices: Annotated[
            bool,
            typer.Option("--list-voices", help="list the model's voices (with -m, that model's) and exit"),
        ] = False,
        speed: Annotated[
            float | None, typer.Option("--speed", min=0.1, max=10.0, help="1.0 is normal, 2.0 twice as fast")
        ] = None,
        audio_format: Annotated[
            str | None,
            typer.Option("--format", "-f", help="wav, mp3, flac or pcm (default: from -o, else wav)"),
        ] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Say a text: write it as speech to an audio file and print the file's path."""
        if list_voices:
            _print_voices(model, as_json)
            return
        if text is None:
            raise fail("say what? give the text to speak (or --list-voices)", EXIT_USAGE)
        fmt = audio_format.lower() if audio_format else _format_of(output)
        if fmt not in FORMATS:
            raise fail(f"--format must be one of {', '.join(FORMATS)}", EXIT_USAGE)
        request = SynthesizeRequest(
            text=text,
            model=model,
            voice=voice,
            speed=speed,
            format=fmt,  # type: ignore[arg-type]
            output_path=str(output) if output else None,
        )
        with spinner("Synthesizing..."):
            result = run(engine().synthesize(request))
        if as_json:
            print_json(result)
            return
        out.print(result.audio_path, markup=False)
        err.print(f"{result.model_used} (voice {result.voice_used}, {result.media_type})", style="dim")


def _print_voices(model: str | None, as_json: bool) -> None:
    from ..engine.speech import list_voices  # lazily, as the engine is

    voices = run(list_voices(engine(), model))
    if as_json:
        print_json(voices)
        return
    for voice in voices.voices:
        mark = "  (default)" if voice.id == voices.default else ""
        name = f"  {voice.name}" if voice.name and voice.name != voice.id else ""
        out.print(f"{voice.id}{name}{mark}", markup=False)
    for alias, target in voices.aliases.items():
        out.print(f"{alias} -> {target}  ([speech] voices)", markup=False)
    note = f"; {voices.note}" if voices.note else ""
    count = len(voices.voices)
    err.print(f"{voices.model}: {count} voice{'' if count == 1 else 's'}{note}", style="dim")


speech_app = typer.Typer(help="Speech checks.", no_args_is_help=True)


@speech_app.command("smoke")
@handle_errors
def smoke(
    local: Annotated[bool, typer.Option("--local/--no-local", help="round trip on local models")] = True,
    remote: Annotated[bool, typer.Option("--remote/--no-remote", help="round trip on hosted models")] = False,
    keep_audio: Annotated[
        bool, typer.Option("--keep-audio", help="keep the spoken audio and print its path")
    ] = False,
    text: Annotated[
        str | None,
        typer.Option("--text", help="the sentence to say and hear back (default: the quick brown fox)"),
    ] = None,
    max_wer: Annotated[
        float | None, typer.Option("--max-wer", min=0.0, help="exit 1 when a word error rate is above this")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Say a sentence and transcribe it back: word error rate and timings per side."""
    if not (local or remote):
        raise fail("nothing to test: --no-local without --remote", EXIT_USAGE)
    if text is not None and not text.strip():  # it spoke the default sentence instead, unsaid
        raise fail("--text is empty: give a sentence to say, or leave --text out", EXIT_USAGE)
    from ..engine.speech import speech_smoke  # lazily, as the engine is: start-up stays quick

    with spinner("Speaking and listening..."):
        report = run(speech_smoke(engine(), local=local, remote=remote, text=text, keep_audio=keep_audio))
    if as_json:
        print_json(report)
    for path in [] if as_json else report.paths:
        audio = f"{path.audio_s:.2f} s of audio" if path.audio_s is not None else "audio"
        out.print(
            f"{path.side}: WER {path.word_error_rate:.0%}  {path.tts_model} -> {path.stt_model}\n"
            f"  said:  {path.text}\n  heard: {path.transcript}\n"
            f"  synthesize {path.synthesize_ms:.0f} ms ({audio}), transcribe {path.transcribe_ms:.0f} ms"
            + (f"\n  {path.audio_path}" if path.audio_path else ""),
            markup=False,
        )
    worst = max((p.word_error_rate for p in report.paths), default=0.0)
    if max_wer is not None and worst > max_wer:
        raise fail(f"word error rate {worst:.0%} is above --max-wer {max_wer:.0%}")


def _format_of(output: Path | None) -> str:
    """The format an output name asks for by its suffix; wav when it has none."""
    suffix = output.suffix.lower().lstrip(".") if output else ""
    if not suffix:
        return "wav"
    named = AUDIO_SUFFIXES.get(suffix)  # the library's reading of a name (raw: pcm)
    if named is None:
        raise fail(f"cannot write .{suffix} files; name a .wav, .mp3, .flac or .pcm file", EXIT_USAGE)
    return named
