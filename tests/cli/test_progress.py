"""The pull progress display: rich bars on a terminal, one line per file or layer elsewhere."""

from __future__ import annotations

import io

from rich.console import Console

from car_inference.cli.progress import PullBars
from car_inference.runtimes.ollama import OllamaProgress


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=120, color_system=None), buffer


def test_a_terminal_gets_a_bar_per_file_with_size_and_speed() -> None:
    console, buffer = _console(terminal=True)
    with PullBars(console) as bars:
        bars.file_started("model-q4.gguf", 2_000_000, 500_000)
        bars.advance("model-q4.gguf", 1_000_000)
        bars.file_started("mmproj.gguf", None, 0)
        bars.advance("mmproj.gguf", 10)
        bars.file_finished("model-q4.gguf", 1_500_000)
    text = buffer.getvalue()
    assert "model-q4.gguf" in text and "2.0/2.0 MB" in text and "mmproj.gguf" in text
    assert "downloaded, verified" not in text, "bars, not lines"


def test_elsewhere_one_line_per_finished_file() -> None:
    console, buffer = _console(terminal=False)
    with PullBars(console) as bars:
        bars.file_started("model-q4.gguf", 2_000_000, 500_000)
        bars.advance("model-q4.gguf", 1_500_000)
        bars.file_finished("model-q4.gguf", 1_500_000)
    assert buffer.getvalue() == "  model-q4.gguf: 2.0 MB, 1.5 MB downloaded, verified\n"


def test_ollama_layers_and_statuses() -> None:
    console, buffer = _console(terminal=False)
    with PullBars(console) as bars:
        bars.ollama(OllamaProgress(status="pulling manifest"))
        for done in (100, 200):
            bars.ollama(OllamaProgress(status="pulling abc", digest="sha256:abc", total=200, completed=done))
        bars.ollama(OllamaProgress(status="success"))
    assert buffer.getvalue().splitlines() == ["  pulling manifest", "  pulling abc (0.0 MB)", "  success"]
    console, buffer = _console(terminal=True)
    with PullBars(console) as bars:
        bars.ollama(
            OllamaProgress(status="pulling abc", digest="sha256:abc", total=4_000_000, completed=1_000_000)
        )
    assert "pulling abc" in buffer.getvalue() and "1.0/4.0 MB" in buffer.getvalue()


def test_disabled_shows_nothing() -> None:
    console, buffer = _console(terminal=False)
    with PullBars(console, enabled=False) as bars:
        bars.file_started("f", 10, 0)
        bars.file_finished("f", 10)
        bars.ollama(OllamaProgress(status="success"))
    assert buffer.getvalue() == ""
