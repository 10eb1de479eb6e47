"""Images and video over HTTP (the ``openai`` SDK against the server) and JSON-RPC, on tiny
random-weight diffusers pipelines and a hosted image model that is the fake provider."""

from __future__ import annotations

import base64
import io
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import openai
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from car_inference.config import ServerSettings
from car_inference.engine import InferenceEngine
from car_inference.routing import InferenceTask
from car_inference.schema import CostModel, ModelCapability, ModelSchema, OpenAISource
from car_inference.server import ServerThread, create_app
from fakes import FakeProviderServer
from fakes.provider_media import png
from fakes.tiny_diffusers import build_ltx, build_sd, media_model

SD = "test/tiny-sd"
LTX = "test/tiny-ltx"
HOSTED = "fakehost/gpt-image-2"


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory, fake_provider: FakeProviderServer
) -> Iterator[InferenceEngine]:
    root = tmp_path_factory.mktemp("pipelines")
    engine = InferenceEngine(home=tmp_path_factory.mktemp("home"))
    engine.register_model(
        media_model(SD, build_sd(root / "sd"), "image_generation", default_params={"steps": 2})
    )
    engine.register_model(
        media_model(LTX, build_ltx(root / "ltx"), "video_generation", default_params={"steps": 2})
    )
    source = OpenAISource(base_url=fake_provider.openai_base_url, model_name="gpt-image-2", needs_key=False)
    engine.register_model(
        ModelSchema(
            id=HOSTED,
            name="gpt-image-2",
            provider="fakehost",
            capabilities=[ModelCapability.IMAGE_GENERATION],
            source=source,
        )
    )
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def server(engine: InferenceEngine) -> Iterator[ServerThread]:
    with ServerThread(create_app(engine)) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def decoded(b64: str | None) -> Image.Image:
    data = base64.b64decode(b64 or "")
    assert data.startswith(b"\x89PNG")
    return Image.open(io.BytesIO(data))


def test_generations_on_a_local_model(client: openai.OpenAI) -> None:
    def generate(seed: int) -> Any:
        return client.images.with_raw_response.generate(
            model=SD,
            prompt="a red apple",
            size="128x64",
            n=2,
            quality="auto",  # OpenAI's default: fine
            extra_body={"seed": seed, "guidance": 2.0},
        )

    raw = generate(4)
    images = raw.parse()
    assert raw.headers["x-car-model"] == SD
    assert images.data and [decoded(i.b64_json).size for i in images.data] == [(128, 64), (128, 64)]
    again = generate(4).parse()
    assert again.data and again.data[0].b64_json == images.data[0].b64_json
    assert images.data[0].b64_json != images.data[1].b64_json


def test_generations_on_a_hosted_model(client: openai.OpenAI, fake_provider: FakeProviderServer) -> None:
    images = client.images.generate(model=HOSTED, prompt="a cat", size="512x256")
    assert images.data and base64.b64decode(images.data[0].b64_json or "") == png(512, 256, seed="a cat#0")
    assert fake_provider.requests[-1].json == {
        "model": "gpt-image-2",
        "prompt": "a cat",
        "size": "512x256",
    }


def test_edits(client: openai.OpenAI, fake_provider: FakeProviderServer) -> None:
    picture = io.BytesIO()
    Image.new("RGB", (96, 64), (0, 90, 200)).save(picture, format="PNG")
    edited = client.images.edit(
        model=SD, image=("in.png", picture.getvalue(), "image/png"), prompt="make it red"
    )
    assert edited.data and decoded(edited.data[0].b64_json).size == (96, 64)
    hosted = client.images.edit(model=HOSTED, image=("in.png", picture.getvalue(), "image/png"), prompt="red")
    assert hosted.data and fake_provider.media.forms[-1]["image"] == (
        "image0.png",
        picture.getvalue(),
        "image/png",
    )
    # Several images (the SDK sends image[] once per file) all reach the model: one was kept.
    second = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 0, 0)).save(second, format="PNG")
    files = [("a.png", picture.getvalue(), "image/png"), ("b.png", second.getvalue(), "image/png")]
    client.images.edit(model=HOSTED, image=files, prompt="both, red")
    sent = fake_provider.media.forms[-1]["image"]
    assert [content for _, content, _ in sent] == [picture.getvalue(), second.getvalue()]
    missing = httpx.post(f"{client.base_url}images/edits", files={"prompt": (None, "x")})
    assert missing.status_code == 400 and "`image` file to edit is required" in missing.text
    # URLs asked for got `url: None` with a 200; generations refuses it the same way.
    with pytest.raises(openai.BadRequestError) as url:
        client.images.edit(
            model=HOSTED,
            image=("in.png", picture.getvalue(), "image/png"),
            prompt="red",
            response_format="url",
        )
    assert url.value.param == "response_format"
    # A file that is no image is the caller's mistake, and the server's folders stay unnamed.
    with pytest.raises(openai.BadRequestError) as bad:
        client.images.edit(model=SD, image=("in.png", b"not a picture", "image/png"), prompt="x")
    assert "cannot read the image" in bad.value.message and "/tmp" not in bad.value.message
    # Named as the client sent it (it read "cannot read the image the uploaded image").
    assert "cannot read the image in.png: cannot identify image file 'in.png'" in bad.value.message


# The SDK types videos.create's ``seconds`` and ``size`` as OpenAI's own choices ("4", "720x1280"...);
# this server takes any for a local model, and the tiny test pipeline needs tiny ones: the
# `type: ignore[arg-type]` on those calls below.


def test_video_job_create_poll_download(client: openai.OpenAI) -> None:
    video = client.videos.create(
        model=LTX,
        prompt="a dog on the moon",
        seconds="1",  # type: ignore[arg-type]
        size="64x64",  # type: ignore[arg-type]
        extra_body={"fps": 8, "seed": 2},
    )
    assert video.status in ("queued", "in_progress") and video.model == LTX
    done = client.videos.poll(video.id, poll_interval_ms=50)
    assert done.status == "completed" and done.progress == 100 and done.completed_at
    assert (done.seconds, done.size) == ("1.125", "64x64"), "what was made: 9 frames at 8 fps"
    content = client.videos.download_content(video.id).content
    with av.open(io.BytesIO(content), mode="r") as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 9 and (frames[0].width, frames[0].height) == (64, 64)
    deleted = client.delete(f"/videos/{video.id}", cast_to=httpx.Response).json()
    assert deleted == {"id": video.id, "object": "video.deleted", "deleted": True}
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_a_json_input_reference_makes_an_image_to_video_job(
    client: openai.OpenAI, server: ServerThread
) -> None:
    """Taken in JSON and dropped: the job ran as text-to-video without a word."""
    reference = "data:image/png;base64," + base64.b64encode(png(64, 64, "red")).decode()
    body = {"model": LTX, "prompt": "a dog", "seconds": "1", "size": "64x64", "fps": 8, "seed": 2}
    bad = httpx.post(server.url + "/v1/videos", json={**body, "input_reference": "not base64!"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input_reference", bad.text
    firsts = []
    for extra in ({}, {"input_reference": reference}):
        job = httpx.post(server.url + "/v1/videos", json={**body, **extra}, timeout=30).json()
        assert client.videos.poll(job["id"], poll_interval_ms=50).status == "completed"
        with av.open(io.BytesIO(client.videos.download_content(job["id"]).content), mode="r") as container:
            firsts.append(next(container.decode(video=0)).to_ndarray().tobytes())
    assert firsts[0] != firsts[1], "the same first frame: the reference was not used"


def test_video_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError, match="tiny-ltxx"):
        client.videos.create(model="test/tiny-ltxx", prompt="x")
    with pytest.raises(openai.BadRequestError, match="does not declare video_generation") as unsuited:
        client.videos.create(model=SD, prompt="x")
    assert unsuited.value.code == "unsupported_mode"  # the client named an image model for a video
    # Input only the model can judge fails the job, with the reason.
    job = client.videos.create(model=LTX, prompt="x", size="70x64", seconds="1")  # type: ignore[arg-type]
    failed = client.videos.poll(job.id, poll_interval_ms=50)
    assert failed.status == "failed" and failed.error and "multiples of 4" in failed.error.message
    assert failed.error.code == "invalid_input"
    with pytest.raises(openai.APIStatusError) as not_ready:
        client.videos.download_content(job.id)
    assert not_ready.value.status_code == 409


def test_running_video_jobs_are_bounded(engine: InferenceEngine) -> None:
    with ServerThread(create_app(engine, ServerSettings(max_concurrency=1))) as small:
        client = openai.OpenAI(base_url=small.url + "/v1", api_key="unused", max_retries=0)
        slow = client.videos.create(
            model=LTX,
            prompt="x",
            seconds="1",  # type: ignore[arg-type]
            size="64x64",  # type: ignore[arg-type]
            extra_body={"steps": 1000},  # MAX_STEPS: slow enough to be running
        )
        with pytest.raises(openai.RateLimitError, match="video jobs are running"):
            client.videos.create(model=LTX, prompt="y", seconds="1", size="64x64")  # type: ignore[arg-type]
        client.delete(f"/videos/{slow.id}", cast_to=httpx.Response)  # cancels it
        started = client.videos.create(model=LTX, prompt="y", seconds="1", size="64x64")  # type: ignore[arg-type]
        assert client.videos.poll(started.id, poll_interval_ms=50).status == "completed"


async def test_json_rpc_methods_with_progress(server: ServerThread) -> None:
    async with connect(server.ws_url, max_size=None) as ws:
        params = {"prompt": "a blue sky", "model": SD, "width": 64, "height": 64, "seed": 9, "steps": 3}
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "generate_image", "params": params}))
        messages = [json.loads(await ws.recv()) for _ in range(4)]
        progress = [m["params"] for m in messages if m.get("method") == "generate.progress"]
        assert progress == [{"request_id": 1, "done": d, "total": 3} for d in (1, 2, 3)]
        result = next(m for m in messages if m.get("id") == 1)["result"]
        assert result["model_used"] == SD and result["seed"] == 9 and "image_path" not in result
        assert decoded(result["images"][0]).size == (64, 64)

        picture = io.BytesIO()
        Image.new("RGB", (64, 64), (0, 90, 200)).save(picture, format="PNG")
        edit = {"prompt": "red", "model": SD, "images": [base64.b64encode(picture.getvalue()).decode()]}
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "generate_image", "params": edit}))
        reply = await _answer(ws, 2)
        assert decoded(reply["result"]["images"][0]).size == (64, 64)

        video = {"prompt": "x", "model": LTX, "width": 64, "height": 64, "fps": 4, "duration_s": 1}
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 3, "method": "generate_video", "params": video}))
        result = (await _answer(ws, 3))["result"]
        assert result["frames"] == 5 and base64.b64decode(result["video"])[4:8] == b"ftyp"

        bad = {"prompt": "x", "model": SD, "output_path": "/etc/passwd"}
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 4, "method": "generate_image", "params": bad}))
        error = (await _answer(ws, 4))["error"]
        assert error["code"] == -32602 and "names a file on the server" in error["message"]
        # The other method's file: it was dropped without a word (an unrelated picture came back).
        cases: list[tuple[int, str, dict[str, Any], str]] = [
            (5, "generate_image", {"prompt": "x", "model": SD, "image": "aGk="}, "did you mean `images`"),
            (6, "generate_video", {"prompt": "x", "model": LTX, "images": ["aGk="]}, "did you mean `image`"),
        ]
        for rid, method, params, hint in cases:
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}))
            error = (await _answer(ws, rid))["error"]
            assert error["code"] == -32602 and hint in error["message"], error


async def _answer(ws: Any, rid: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        message = json.loads(await ws.recv())
        if message.get("id") == rid:
            return message
    raise AssertionError(f"no answer to {rid}")


def test_a_routed_video_job_goes_on_to_a_model_that_can_take_it(
    tmp_path: Path, fake_provider: FakeProviderServer
) -> None:
    """A job naming no model was pinned to the router's first choice: a hosted model that takes
    no `steps` failed every such job, while JSON-RPC's went on to the local pipeline."""
    engine = InferenceEngine(home=tmp_path / "home")
    engine.register_model(media_model(LTX, build_ltx(tmp_path / "ltx"), "video_generation"))
    hosted = "fakehost/sora"
    source = OpenAISource(base_url=fake_provider.openai_base_url, model_name="sora-2", needs_key=False)
    engine.register_model(
        ModelSchema(
            id=hosted,
            name="sora-2",
            provider="fakehost",
            capabilities=[ModelCapability.VIDEO_GENERATION],
            source=source,
        )
    )
    for i in range(30):  # its calls went well: the router ranks it first
        engine.tracker.record_attempt(
            hosted, InferenceTask.GENERATE_VIDEO, "video", "media", trace_id=f"good-{i}",
            started_at=0.0, success=True, latency_ms=500.0,
        )  # fmt: skip
    engine.config.routing = engine.config.routing.model_copy(update={"exploration": 0.0})
    assert engine.media_model(None, ModelCapability.VIDEO_GENERATION).id == hosted
    try:
        with ServerThread(create_app(engine)) as running:
            client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
            job = client.videos.create(
                prompt="waves",
                seconds="1",  # type: ignore[arg-type]
                size="64x64",  # type: ignore[arg-type]
                extra_body={"steps": 2},
            )
            done = client.videos.poll(job.id, poll_interval_ms=50)
        assert done.status == "completed" and done.model == LTX, done.error
    finally:
        engine.close()


def test_one_client_cannot_hold_every_video_job(engine: InferenceEngine) -> None:
    """One API key started as many jobs as the server takes (max_concurrency) and every other
    client's first video was refused: jobs count against their client's share too. And another
    key could read and delete them."""
    settings = ServerSettings(api_keys=["key-one-0000000001", "key-two-0000000002"],
                              max_concurrency=4, max_in_flight_per_client=1)  # fmt: skip
    with ServerThread(create_app(engine, settings)) as small:
        one, two = (
            openai.OpenAI(base_url=small.url + "/v1", api_key=key, max_retries=0) for key in settings.api_keys
        )
        slow = one.videos.create(
            model=LTX,
            prompt="x",
            seconds="1",  # type: ignore[arg-type]
            size="64x64",  # type: ignore[arg-type]
            extra_body={"steps": 1000},
        )
        with pytest.raises(openai.RateLimitError, match="this client has 1 video jobs running") as busy:
            one.videos.create(model=LTX, prompt="y", seconds="1", size="64x64")  # type: ignore[arg-type]
        assert busy.value.code == "client_busy"
        other = two.videos.create(model=LTX, prompt="y", seconds="1", size="64x64")  # type: ignore[arg-type]
        for not_mine in (lambda: two.videos.retrieve(slow.id), lambda: two.videos.delete(slow.id)):
            with pytest.raises(openai.NotFoundError):  # another key's job is unknown to it
                not_mine()
        one.delete(f"/videos/{slow.id}", cast_to=httpx.Response)  # cancels it
        assert two.videos.poll(other.id, poll_interval_ms=50).status == "completed"


def test_the_finished_videos_go_with_the_server(engine: InferenceEngine) -> None:
    """They were removed by an exit hook, which a SIGTERM (systemd, docker) never runs: every
    finished video stayed in /tmp. The app's shutdown removes them."""
    before = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("car-videos-")}
    app = create_app(engine)
    with ServerThread(app) as running:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        job = client.videos.create(model=LTX, prompt="y", seconds="1", size="64x64")  # type: ignore[arg-type]
        assert client.videos.poll(job.id, poll_interval_ms=50).status == "completed"
        made = {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("car-videos-")} - before
        assert len(made) == 1
    assert not (Path(tempfile.gettempdir()) / made.pop()).exists()
    del app


def test_a_video_the_named_model_would_refuse_is_refused_when_asked_for(
    tmp_path: Path, fake_provider: FakeProviderServer
) -> None:
    """A named model's own rules (`steps` on the Videos API, whole seconds) and a spend limit the
    estimate would pass were accepted as jobs that failed on the first poll: now a 400 / 402 at
    creation, no job kept, nothing sent."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text("[spend]\ndaily_usd = 1.0\n")
    engine = InferenceEngine(home=home)
    source = OpenAISource(base_url=fake_provider.openai_base_url, model_name="sora-2", needs_key=False)
    engine.register_model(
        ModelSchema(
            id="fakehost/sora",
            name="sora-2",
            provider="fakehost",
            capabilities=[ModelCapability.VIDEO_GENERATION],
            source=source,
            cost=CostModel(per_second=0.1),
        )
    )
    sent = len(fake_provider.requests)
    try:
        with ServerThread(create_app(engine)) as running:
            client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.BadRequestError, match="steps") as steps:
                client.videos.create(model="fakehost/sora", prompt="waves", extra_body={"steps": 2})
            assert steps.value.code == "unsupported_mode"
            with pytest.raises(openai.BadRequestError, match="whole seconds"):
                client.videos.create(model="fakehost/sora", prompt="waves", extra_body={"seconds": "2.5"})
            with pytest.raises(openai.APIStatusError, match="limit") as spend:
                client.videos.create(model="fakehost/sora", prompt="waves", seconds="12")
            assert spend.value.status_code == 402
            assert engine.spend.status().by_provider_today == {}
        assert len(fake_provider.requests) == sent
    finally:
        engine.close()
