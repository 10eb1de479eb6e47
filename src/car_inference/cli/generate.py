"""`car generate` and `car chat`."""

from __future__ import annotations

import contextlib
import sys
from typing import Annotated, Any

import typer

from ..requests import GenerateParams, GenerateRequest, InferenceResult, Message, ThinkingMode
from ..stream import Done, ErrorEvent, RouteEvent, TextDelta, ThinkingDelta, ToolCallStart
from .common import engine, err, fail, handle_errors, out, print_json, run, spinner

ModelOpt = Annotated[
    str | None, typer.Option("--model", "-m", help="model id, name or alias (default: route)")
]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="system prompt")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="most tokens to generate")]
TemperatureOpt = Annotated[
    float | None, typer.Option("--temperature", "-t", min=0.0, max=2.0, help="0 = greedy")
]
ThinkingOpt = Annotated[
    ThinkingMode, typer.Option("--thinking", help="reasoning mode for models that have one")
]


def _params(
    max_tokens: int, temperature: float | None, thinking: ThinkingMode, seed: int | None
) -> GenerateParams:
    values: dict[str, Any] = {"max_tokens": max_tokens, "thinking": thinking}
    if temperature is not None:
        values["temperature"] = temperature
    if seed is not None:
        values["seed"] = seed
    return GenerateParams(**values)


async def _stream_to_terminal(eng: Any, request: GenerateRequest, show_spinner: bool) -> Done | None:
    """Print deltas as they arrive (thinking dimmed on stderr); return the final event. The
    spinner runs until the first output, which covers loading the model."""
    final: Done | None = None
    with contextlib.ExitStack() as waiting:
        waiting.enter_context(spinner("Loading model...", enabled=show_spinner))
        async for event in eng.stream(request):
            if isinstance(event, RouteEvent):
                continue
            waiting.close()
            if isinstance(event, TextDelta):
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, ThinkingDelta):
                err.print(event.text, style="dim", end="")
            elif isinstance(event, ToolCallStart):
                err.print(f"\n[tool call] {event.name}", style="cyan")
            elif isinstance(event, ErrorEvent):
                sys.stdout.write("\n")
                raise fail(event.message)
            elif isinstance(event, Done):
                final = event
    sys.stdout.write("\n")
    sys.stdout.flush()
    return final


def _print_tool_calls(result: InferenceResult | Done) -> None:
    for call in result.tool_calls:
        err.print(f"[tool call] {call.name}({call.arguments or call.invalid_arguments})", style="cyan")


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def generate(
        prompt: Annotated[str, typer.Argument(help="the prompt; '-' reads it from stdin")],
        model: ModelOpt = None,
        system: SystemOpt = None,
        max_tokens: MaxTokensOpt = 512,
        temperature: TemperatureOpt = None,
        seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
        thinking: ThinkingOpt = ThinkingMode.AUTO,
        stream: Annotated[
            bool | None,
            typer.Option(
                "--stream/--no-stream", help="print tokens as they come (default: on in a terminal)"
            ),
        ] = None,
        as_json: Annotated[bool, typer.Option("--json", help="print the InferenceResult as JSON")] = False,
    ) -> None:
        """Generate text from a prompt."""
        if prompt == "-":
            prompt = sys.stdin.read()
        if not prompt.strip():
            raise fail("the prompt is empty", 2)
        request = GenerateRequest(
            prompt=prompt,
            model=model,
            context=system,
            params=_params(max_tokens, temperature, thinking, seed),
        )
        eng = engine()
        if as_json:
            print_json(run(eng.generate(request)))
            return
        if stream if stream is not None else out.is_terminal:
            final = run(_stream_to_terminal(eng, request, show_spinner=True))
            if final is not None:
                _print_tool_calls(final)
            return
        with spinner("Generating..."):
            result = run(eng.generate(request))
        if result.thinking:
            err.print(result.thinking, style="dim")
        sys.stdout.write(result.text + "\n")
        _print_tool_calls(result)

    @app.command()
    @handle_errors
    def chat(
        model: ModelOpt = None,
        system: SystemOpt = None,
        max_tokens: MaxTokensOpt = 512,
        temperature: TemperatureOpt = None,
        thinking: ThinkingOpt = ThinkingMode.AUTO,
    ) -> None:
        """Talk with a model; history is kept. /exit (or Ctrl-D) leaves, /clear forgets."""
        eng = engine()
        history: list[Message] = []
        err.print("Type /exit to leave, /clear to start over.", style="dim")
        params = _params(max_tokens, temperature, thinking, None)

        async def session() -> None:
            while True:
                try:
                    line = input("you> ")
                except EOFError:
                    err.print()
                    return
                if line.strip() in ("/exit", "/quit"):
                    return
                if line.strip() == "/clear":
                    history.clear()
                    continue
                if not line.strip():
                    continue
                history.append(Message(role="user", content=line))
                request = GenerateRequest(messages=list(history), model=model, context=system, params=params)
                sys.stdout.write("car> ")
                final = await _stream_to_terminal(eng, request, show_spinner=not history[:-1])
                if final is not None:
                    history.append(Message(role="assistant", content=final.text, tool_calls=final.tool_calls))

        run(session())
