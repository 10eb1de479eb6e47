"""The blocking facade."""

from __future__ import annotations

import base64
import inspect
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from car_inference.config import CarConfig
from car_inference.engine import InferenceEngine, SyncInferenceEngine
from car_inference.errors import InferenceError, InvalidInput
from car_inference.requests import (
    GenerateImageRequest,
    GenerateParams,
    GenerateRequest,
    GenerateVideoRequest,
    GroundRequest,
    ImageBlock,
    SynthesizeRequest,
    TranscribeRequest,
)
from car_inference.stream import Done
from fakes.images import text_sign
from fakes.tiny_diffusers import build_ltx, build_sd, media_model

SMOL = "huggingface/smollm2-135m-instruct:q4_1"


def greedy(prompt: str, max_tokens: int = 40, **kw: object) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, params=GenerateParams(temperature=0, max_tokens=max_tokens), **kw)  # type: ignore[arg-type]


def test_sync_facade(local_engine: InferenceEngine) -> None:
    with SyncInferenceEngine(local_engine) as sync:
        result = sync.generate(
            "What is the capital of France?", params=GenerateParams(temperature=0, max_tokens=40)
        )
        assert "Paris" in result.text
        events = list(sync.stream(greedy("Say hi.", 8)))
        assert isinstance(events[-1], Done)
        assert sync.tokenize("smollm2", "hi").tokens


def test_every_async_engine_method_has_a_blocking_twin() -> None:
    """A coroutine method added to InferenceEngine without a SyncInferenceEngine wrapper fails here."""
    missing = [
        name
        for name, member in inspect.getmembers(InferenceEngine, inspect.iscoroutinefunction)
        if not name.startswith("_")
        and (
            not hasattr(SyncInferenceEngine, name)
            or inspect.iscoroutinefunction(getattr(SyncInferenceEngine, name))
        )
    ]
    assert missing == []


# The engine's blocking methods the facade leaves to ``sync.engine``: maintenance the CLI runs
# with a stop event, and helpers of other methods.
ENGINE_ONLY = {
    "compact_spend", "prune_traces", "forget_templates", "export_profiles_file", "media_model",
    "open_trace", "routing_scenarios", "runner_models",
}  # fmt: skip


def test_every_public_blocking_method_has_a_twin_or_is_named_engine_only() -> None:
    missing = [
        name
        for name, member in inspect.getmembers(InferenceEngine, inspect.isfunction)
        if not name.startswith("_") and not hasattr(SyncInferenceEngine, name) and name not in ENGINE_ONLY
    ]
    assert missing == []


def test_sync_speech_grounding_and_media(isolated_home: Path, tmp_path: Path) -> None:
    """Piper speaks, Whisper hears it back, OCR boxes a sign's text, a tiny diffusers pipeline
    paints and films: each through the blocking facade, on real local models."""
    engine = InferenceEngine(home=isolated_home)
    folder = tmp_path / "pipelines"
    engine.register_model(media_model("test/tiny-sd", build_sd(folder / "sd"), "image_generation"))
    engine.register_model(media_model("test/tiny-ltx", build_ltx(folder / "ltx"), "video_generation"))
    with SyncInferenceEngine(engine) as sync:
        # Piper's voice varies from run to run (VITS samples noise): "Hello world." came back once
        # as "A Low World."; a longer sentence gives Whisper context.
        text = "The quick brown fox jumps over the lazy dog."
        spoken = sync.synthesize(SynthesizeRequest(text=text, output_path=str(tmp_path / "a.wav")))
        heard = sync.transcribe(TranscribeRequest(audio_path=spoken.audio_path, language="en"))
        assert "fox" in heard.text.lower() and "dog" in heard.text.lower(), heard.text
        image = ImageBlock(data=base64.b64encode(text_sign()).decode(), media_type="image/png")
        found = sync.ground(GroundRequest(prompt="exit 42", image=image))
        assert [b.label for b in found.boxes] == ["exit 42"]
        steps: list[tuple[int, int]] = []
        painted = sync.generate_image(
            GenerateImageRequest(
                prompt="a red apple", model="test/tiny-sd", width=64, height=64, steps=2, seed=1
            ),
            progress=lambda done, total: steps.append((done, total)),
        )
        assert Path(painted.image_path).read_bytes().startswith(b"\x89PNG") and steps[-1] == (2, 2)
        filmed = sync.generate_video(
            GenerateVideoRequest(
                prompt="a dog", model="test/tiny-ltx", width=64, height=64, steps=2, fps=8, duration_s=1.0
            )
        )
        assert filmed.video_path.endswith(".mp4") and Path(filmed.video_path).stat().st_size > 0
        assert sync.warm_up(["no-such-model"])[0] is not None
        assert sync.model_health().speech.tts_model == "piper/en_us-joe-medium"
        assert sync.list_voices().ids() == ["en_US-joe-medium"]


def test_a_runner_registered_through_the_facade_serves_its_model(isolated_home: Path) -> None:
    """A delegated model served by an async function, called from blocking code."""
    (isolated_home / "models.toml").write_text(
        '[[models]]\nid = "host/echo"\nname = "echo"\nprovider = "host"\ncapabilities = ["generate"]\n'
        'context_length = 4096\n[models.source]\nkind = "delegated"\n'
    )

    async def echo(model: object, request: GenerateRequest) -> str:
        return "echo: " + (request.prompt or "")

    with SyncInferenceEngine(InferenceEngine(home=isolated_home)) as sync:
        registration = sync.register_runner(echo, ["host/echo"])
        assert sync.generate(GenerateRequest(prompt="hi", model="host/echo")).text == "echo: hi"
        assert sync.unregister_runner(registration) is True
        assert not sync.engine.registry.get("host/echo").available  # type: ignore[union-attr]


def test_route_only_use_through_the_facade(isolated_home: Path) -> None:
    """A script that runs the model itself: route, report the outcome, see it learned."""
    with SyncInferenceEngine(InferenceEngine(home=isolated_home)) as sync:
        decision = sync.route(GenerateRequest(prompt="Name a colour."))
        trace = sync.report(decision, score=1.0, latency_ms=120.0, output_tokens=3)
        assert trace
        sync.flush()
        profile = next(p for p in sync.export_profiles() if p.model_id == decision.model_id)
        assert profile.total_calls == 1
        assert sync.forget_model(decision.model_id)[0] == decision.model_id
        assert all(p.model_id != decision.model_id for p in sync.export_profiles())


def test_prompt_keywords_reach_request_and_params(local_engine: InferenceEngine) -> None:
    with SyncInferenceEngine(local_engine) as sync:
        result = sync.generate("Say hi.", max_tokens=3, temperature=0, model="smollm2")
        assert result.model_used == SMOL and result.usage is not None and result.usage.completion_tokens <= 3
        with pytest.raises(InvalidInput, match="max_tokns: Extra inputs are not permitted"):
            sync.generate("Say hi.", max_tokns=3)
        with pytest.raises(InvalidInput, match="max_tokens: Input should be greater than or equal to 1"):
            sync.generate("Say hi.", max_tokens=-1)
        with pytest.raises(InvalidInput, match="generate takes a GenerateRequest, not dict"):
            sync.generate({"prompt": "Say hi."})  # type: ignore[arg-type]


def test_a_closed_facade_refuses_calls_and_closes_the_engine_it_made(isolated_home: Path) -> None:
    """Used after close, a call used to wait for ever on the stopped loop; leaving the block did
    not close the engine (its models stayed in `car models ps`)."""
    sync = SyncInferenceEngine(home=isolated_home)
    with sync:
        assert sync.warm_up("smollm2") == [None]  # one id as a str (it was split into letters)
        sync.generate(greedy("Say hi.", 1, model="smollm2"))
        assert list((isolated_home / "loaded").iterdir())  # this process holds SmolLM2
        with pytest.raises(InvalidInput, match="no endpoint named 'gpubox'"):  # answered {}
            sync.discover_endpoints("gpubox")
    assert not list((isolated_home / "loaded").iterdir())
    assert sync.engine.cache.keys() == []  # let go of, though `sync` is still referenced
    with pytest.raises(InferenceError, match="closed"):
        sync.generate("Say hi.")
    # The blocking methods answered after close (route, report, an export...), unlike the rest.
    for call in (
        lambda: sync.route(GenerateRequest(prompt="hi")),
        lambda: sync.report(object(), success=True),  # type: ignore[arg-type]
        lambda: sync.feedback("trace", 1.0),
        sync.export_profiles,
        sync.list_models,
        lambda: sync.resolve("smollm2"),
        sync.flush,
        lambda: sync.register_runner(lambda request: "hi", ["app/after-close"]),  # was taken
    ):
        with pytest.raises(InferenceError, match="SyncInferenceEngine is closed"):
            call()
    sync.close()  # twice is fine


def test_constructor_mistakes_are_said_not_taken(isolated_home: Path) -> None:
    """A path given positionally was taken as the engine (AttributeError at the first call), and
    settings given beside an engine were ignored."""
    with pytest.raises(
        InvalidInput, match=r"engine must be an InferenceEngine, not str \(a home folder is home"
    ):
        SyncInferenceEngine(str(isolated_home))  # type: ignore[arg-type]
    engine = InferenceEngine(home=isolated_home)
    try:
        with pytest.raises(InvalidInput, match="home make a new engine"):
            SyncInferenceEngine(engine, home=isolated_home)
    finally:
        engine.close()
    with pytest.raises(InvalidInput, match="config must be a CarConfig, not str"):
        InferenceEngine(str(isolated_home))  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="give config or home, not both"):
        InferenceEngine(CarConfig(home=isolated_home), home=isolated_home)


def test_a_facade_dropped_without_close_ends_its_loop_thread(isolated_home: Path) -> None:
    """Each facade a loop made and dropped kept its loop thread (and three descriptors) for good."""
    import gc

    engine = InferenceEngine(home=isolated_home)
    try:
        before = sum(t.name == "car-inference-loop" for t in threading.enumerate())
        for _ in range(5):
            SyncInferenceEngine(engine).list_models()
        gc.collect()
        deadline = time.monotonic() + 10
        while sum(t.name == "car-inference-loop" for t in threading.enumerate()) > before:
            assert time.monotonic() < deadline, "the dropped facades' threads still run"
            time.sleep(0.05)
    finally:
        engine.close()


def test_a_call_from_the_loop_thread_is_refused_not_a_deadlock(isolated_home: Path) -> None:
    """An async runner runs on the facade's loop thread: a blocking call from there would wait for
    itself for ever."""
    (isolated_home / "models.toml").write_text(
        '[[models]]\nid = "host/echo"\nname = "echo"\nprovider = "host"\ncapabilities = ["generate"]\n'
        'context_length = 4096\n[models.source]\nkind = "delegated"\n'
    )
    with SyncInferenceEngine(home=isolated_home) as sync:

        async def nested(model: object, request: GenerateRequest) -> str:
            try:
                sync.tokenize("smollm2", "x")
            except InferenceError as exc:
                return str(exc)
            return "no error"

        sync.register_runner(nested, ["host/echo"])
        text = sync.generate(GenerateRequest(prompt="hi", model="host/echo")).text
        assert "own event-loop thread" in text


def test_close_from_another_thread_ends_a_call_in_flight_with_an_error(isolated_home: Path) -> None:
    """A thread in a call while another closed the facade waited for ever (the loop stopped under
    it); now its call is cancelled, its cleanup runs, and it raises InferenceError."""
    import threading
    import time

    sync = SyncInferenceEngine(home=isolated_home)
    sync.generate(greedy("Say hi.", 1, model="smollm2"))  # loaded
    outcome: list[BaseException | str] = []

    def call() -> None:
        try:
            outcome.append(
                sync.generate(greedy("Write a long story about a dragon.", 400, model="smollm2")).text
            )
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=call)
    worker.start()
    time.sleep(1.0)  # the generation runs
    sync.close()
    worker.join(30)
    assert not worker.is_alive(), "the call never returned"
    assert isinstance(outcome[0], InferenceError) and "closed during the call" in str(outcome[0])


def test_ctrl_c_during_a_call_stops_its_work(isolated_home: Path) -> None:
    """KeyboardInterrupt reached the caller at once but the generation ran on to max_tokens (the
    next call waited for it) and was recorded as a success; now it is cancelled: abandoned."""
    import os
    import signal
    import sqlite3
    import threading
    import time

    with SyncInferenceEngine(home=isolated_home) as sync:
        sync.generate(greedy("Say hi.", 1, model="smollm2"))
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            sync.generate(greedy("Write a long story about a dragon.", 400, model="smollm2"))
        timer.join()
        rows: list[tuple[str]] = []
        for _ in range(100):  # the cancellation runs on the loop thread, then its record is queued
            sync.engine.flush()
            with sqlite3.connect(isolated_home / "state.db") as conn:
                rows = conn.execute("SELECT outcome FROM traces ORDER BY started_at").fetchall()
            if len(rows) == 2:
                break
            time.sleep(0.1)
        assert [r[0] for r in rows] == ["success", "abandoned"]


def test_a_stream_dropped_after_close_says_nothing(isolated_home: Path) -> None:
    """Its generator's close ran on the stopped loop: an "Exception ignored ... is closed" traceback."""
    code = (
        "import gc\n"
        "from car_inference import SyncInferenceEngine\n"
        "engine = SyncInferenceEngine()\n"
        "events = engine.stream('Count to ten.', model='smollm2', max_tokens=20)\n"
        "next(events)\n"
        "engine.close()\n"
        "del events\n"
        "gc.collect()\n"
        "print('done')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CAR_HOME": str(isolated_home)},
        check=False,
    )
    assert done.returncode == 0 and "done" in done.stdout and "Exception ignored" not in done.stderr, (
        done.stderr
    )


def test_route_takes_a_prompt_string_as_generate_does(isolated_home: Path) -> None:
    with SyncInferenceEngine(home=isolated_home) as sync:
        decision = sync.route("Write a Python function that merges two sorted lists", max_tokens=64)
        assert decision.task_family == "code"
        assert sync.route(GenerateRequest(prompt="hi", model="smollm2")).strategy == "explicit"
        with pytest.raises(InvalidInput):
            sync.route("hi", max_tokens=-1)


def test_every_public_method_has_a_docstring() -> None:
    """help() on a facade method said nothing: the blocking ones take the engine's docstring."""
    undocumented = [
        name
        for name, method in vars(SyncInferenceEngine).items()
        if callable(method) and not name.startswith("_") and not (method.__doc__ or "").strip()
    ]
    assert undocumented == []
    assert SyncInferenceEngine.generate.__doc__ == InferenceEngine.generate.__doc__
