"""`car generate` and `car chat`."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.markup import escape

from ..errors import InferenceError, validation_summary
from ..requests import GenerateParams, GenerateRequest, InferenceResult, Message, ThinkingMode, TokenUsage
from ..schema import ModelCapability
from ..stream import Done, ErrorEvent, RouteEvent, TextDelta, ThinkingDelta, ToolCallStart
from .common import EXIT_USAGE, engine, err, fail, handle_errors, named_model, out, print_json, run, spinner

ModelOpt = Annotated[
    str | None,
    typer.Option("--model", "-m", callback=named_model, help="model id, name or alias (default: route)"),
]
SystemOpt = Annotated[str | None, typer.Option("--system", "-s", help="system prompt")]
MaxTokensOpt = Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="most tokens to generate")]
TemperatureOpt = Annotated[
    float | None, typer.Option("--temperature", "-t", min=0.0, max=2.0, help="0 = greedy")
]
ThinkingOpt = Annotated[
    ThinkingMode, typer.Option("--thinking", help="reasoning mode for models that have one")
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--base-url",
        help="an OpenAI-compatible server (vLLM, Ollama /v1, LM Studio, a proxy); --model names its model",
    ),
]
ApiKeyEnvOpt = Annotated[
    str | None,
    typer.Option("--api-key-env", help="the variable holding the --base-url server's API key"),
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


def _ad_hoc_model(eng: Any, base_url: str | None, api_key_env: str | None, model: str | None) -> str | None:
    """``--base-url URL --model M``: M on that server, registered for this run only."""
    if base_url is None:
        if api_key_env is not None:
            raise fail("--api-key-env goes with --base-url", EXIT_USAGE)
        return model
    if not base_url.startswith(("http://", "https://")):
        raise fail(f"--base-url must be an http:// or https:// URL, not {base_url!r}", EXIT_USAGE)
    if not model:
        raise fail("--base-url needs --model: the model name the server serves", EXIT_USAGE)
    return str(eng.register_endpoint(base_url, model, api_key_env=api_key_env).id)


async def _stream_to_terminal(
    eng: Any, request: GenerateRequest, show_spinner: bool, shown: list[str] | None = None
) -> Done | None:
    """Print deltas as they arrive (thinking dimmed on stderr); return the final event. The
    spinner runs until the first output, which covers loading the model. ``shown`` collects the
    text printed so far (what an interrupted chat turn keeps)."""
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
                if shown is not None:
                    shown.append(event.text)
            elif isinstance(event, ThinkingDelta):
                err.print(event.text, style="dim", end="")
            elif isinstance(event, ToolCallStart):
                err.print(escape(f"\n[tool call] {event.name}"), style="cyan")
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
        err.print(
            escape(f"[tool call] {call.name}({call.arguments or call.invalid_arguments})"), style="cyan"
        )


def _note_cut(finish_reason: str | None, max_tokens: int, usage: TokenUsage | None = None) -> None:
    """Say on stderr when the answer was cut, so a truncated answer is not taken for a whole one,
    and when the prompt was (a 50 KB prompt was cut to the window's tail without a word)."""
    if finish_reason == "length":
        sys.stdout.flush()  # after the answer, not before it
        err.print(f"(cut at the {max_tokens}-token limit: raise it with -n)", style="dim", markup=False)
    if usage is not None and usage.needs_compaction:
        sys.stdout.flush()
        window = f"{usage.context_window}-token " if usage.context_window else ""
        err.print(
            f"(the prompt was longer than the model's {window}window: only its end was read)",
            style="dim",
            markup=False,
        )


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def generate(
        prompt: Annotated[str, typer.Argument(help="the prompt; '-' reads it from stdin")],
        model: ModelOpt = None,
        base_url: BaseUrlOpt = None,
        api_key_env: ApiKeyEnvOpt = None,
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
        if as_json and stream:  # --json printed the result object and the stream was dropped
            raise fail("--json prints one result object at the end: leave --stream out", 2)
        eng = engine(discover=model is None and base_url is None)
        request = GenerateRequest(
            prompt=prompt,
            model=_ad_hoc_model(eng, base_url, api_key_env, model),
            context=system,
            params=_params(max_tokens, temperature, thinking, seed),
        )
        if as_json:
            print_json(run(eng.generate(request)))
            return
        if stream if stream is not None else out.is_terminal:
            final = run(_stream_to_terminal(eng, request, show_spinner=True))
            if final is not None:
                _print_tool_calls(final)
                _note_cut(final.finish_reason, max_tokens, final.usage)
            return
        with spinner("Generating..."):
            result = run(eng.generate(request))
        if result.thinking:
            err.print(result.thinking, style="dim")
        sys.stdout.write(result.text + "\n")
        _print_tool_calls(result)
        _note_cut(result.finish_reason, max_tokens, result.usage)

    @app.command()
    @handle_errors
    def chat(
        model: ModelOpt = None,
        base_url: BaseUrlOpt = None,
        api_key_env: ApiKeyEnvOpt = None,
        system: SystemOpt = None,
        max_tokens: MaxTokensOpt = 512,
        temperature: TemperatureOpt = None,
        thinking: ThinkingOpt = ThinkingMode.AUTO,
    ) -> None:
        """Talk with a model; history is kept. /exit (or Ctrl-D, Ctrl-C at the prompt) leaves,
        /clear forgets, Ctrl-C during an answer stops the answer."""
        eng = engine(discover=model is None and base_url is None)
        model = _ad_hoc_model(eng, base_url, api_key_env, model)
        if model:  # before the first prompt: an unknown or non-generating model was found after it
            schema = eng.resolve(model)
            if not schema.has_capability(ModelCapability.GENERATE):
                raise fail(f"{schema.id} does not generate text: chat needs a generation model", EXIT_USAGE)
        params = _params(max_tokens, temperature, thinking, None)
        err.print(HELP, style="dim")
        # One loop for the whole chat (remote clients keep their connections), but the prompt is
        # read outside it: a Ctrl-C at the prompt then interrupts input() at once, and one during
        # an answer cancels only that answer (asyncio.Runner turns SIGINT into a cancellation).
        with asyncio.Runner() as runner:
            _chat_loop(runner, eng, model, system, params)


HELP = "Type /exit to leave, /clear to start over."


def _chat_loop(
    runner: asyncio.Runner, eng: Any, model: str | None, system: str | None, params: GenerateParams
) -> None:
    history: list[Message] = []
    # Piped input has no echo: the prompt only ran into the answer ("you> car> ...").
    prompt = "you> " if sys.stdin.isatty() else ""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:  # a line that is not UTF-8 is that turn's error, not the chat's end
        reconfigure(errors="surrogateescape")
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            err.print()
            return
        except KeyboardInterrupt:
            err.print()
            raise typer.Exit(130) from None
        if line in ("/exit", "/quit"):
            return
        if line == "/clear":
            history.clear()
            continue
        if not line:
            continue
        if line.startswith("/") and " " not in line:  # /help, or a typo such as /exti
            err.print(
                HELP if line == "/help" else f"unknown command {line}: {HELP}", style="dim", markup=False
            )
            continue
        try:
            history.append(Message(role="user", content=line))
            request = GenerateRequest(messages=list(history), model=model, context=system, params=params)
        except ValidationError as exc:  # a line that is not text (bytes that are not UTF-8)
            history.pop()
            err.print(f"error: {validation_summary(exc)}", style="red", markup=False)
            continue
        sys.stdout.write("car> ")
        shown: list[str] = []
        try:
            final = runner.run(_stream_to_terminal(eng, request, not history[:-1], shown))
        except InferenceError as exc:  # this turn failed; the chat and its history go on
            sys.stdout.write("\n")
            err.print(f"error: {' '.join(str(exc).split())}", style="red", markup=False)
            history.pop()
            continue
        except (KeyboardInterrupt, asyncio.CancelledError):
            sys.stdout.write("\n")
            err.print("[stopped]", style="dim", markup=False)
            # The answer so far stays in the history (it is what the user saw); none, no turn.
            if shown:
                history.append(Message(role="assistant", content="".join(shown)))
            else:
                history.pop()
            continue
        if final is not None:
            history.append(Message(role="assistant", content=final.text, tool_calls=final.tool_calls))
