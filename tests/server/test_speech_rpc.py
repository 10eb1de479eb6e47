"""JSON-RPC ``synthesize`` and ``transcribe`` over /ws, with a real client against a real server
in front of the embedded Piper voice and Whisper base."""

from __future__ import annotations

import base64
import json
import os
import tempfile

from websockets.asyncio.client import connect

from car_inference.server import ServerThread

from .test_jsonrpc import call


def _rpc_folders() -> set[str]:
    names = os.listdir(tempfile.gettempdir())
    return {p for p in names if p.startswith(("car-rpc-audio-", "car-rpc-speech-"))}


async def test_speech_round_trip_over_json_rpc(local_server: ServerThread) -> None:
    before = _rpc_folders()
    async with connect(local_server.ws_url) as ws:
        spoken = (await call(ws, "synthesize", {"text": "The quick brown fox.", "model": "auto"}))["result"]
        assert (spoken["model_used"], spoken["media_type"], spoken["voice_used"]) == (
            "piper/en_us-joe-medium",
            "audio/wav",
            "en_US-joe-medium",
        )
        audio = base64.b64decode(spoken["audio"])
        assert audio[:4] == b"RIFF" and len(audio) > 10_000 and "audio_path" not in spoken
        heard = (await call(ws, "transcribe", {"audio": spoken["audio"], "language": "en"}, rid=2))["result"]
        assert heard["model_used"] == "systran/faster-whisper-base" and "fox" in heard["text"].lower()
        # A client's file name never reaches the file system: one with a NUL byte was a -32603.
        odd = {"audio": spoken["audio"], "language": "en", "filename": "../fox.w\x00av"}
        assert "fox" in (await call(ws, "transcribe", odd, rid=3))["result"]["text"].lower()
        # "stream": true sends each segment as it is decoded, then the result.
        streamed = {"audio": spoken["audio"], "language": "en", "stream": True}
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 4, "method": "transcribe", "params": streamed}))
        messages = [json.loads(await ws.recv())]
        while "id" not in messages[-1]:
            messages.append(json.loads(await ws.recv()))
        *segments, answer = messages
        assert segments and {m["method"] for m in segments} == {"transcribe.segment"}
        assert {m["params"]["request_id"] for m in segments} == {4}
        texts = [m["params"]["segment"]["text"] for m in segments]
        assert texts == [seg["text"] for seg in answer["result"]["segments"]] and "fox" in texts[0].lower()
    assert _rpc_folders() <= before  # a server killed earlier on the machine may have left its own


async def test_bad_speech_calls_are_invalid_params(local_server: ServerThread) -> None:
    async with connect(local_server.ws_url) as ws:
        for rid, (method, params, param) in enumerate(
            [
                ("transcribe", {"audio": "not base64!"}, "audio"),
                ("transcribe", {}, "audio"),
                ("transcribe", {"audio_path": "/etc/passwd"}, "audio_path"),
                ("transcribe", {"audio": "UklGRg==", "stream": "yes"}, "stream"),
                ("synthesize", {"text": "hi", "output_path": "/tmp/x.wav"}, "output_path"),
                ("synthesize", {"text": "a" * 4097}, "text"),  # HTTP's limit (it ran 30 s uncapped)
                ("synthesize", {"text": "hi", "stream": True}, "stream"),  # transcribe's: was ignored
            ]
        ):
            error = (await call(ws, method, params, rid=rid))["error"]
            assert error["code"] == -32602 and error["data"]["param"] == param, error
        noise = base64.b64encode(b"RIFF0000WAVEjunk").decode()
        undecodable = (await call(ws, "transcribe", {"audio": noise, "filename": "a.wav"}, rid=9))["error"]
        assert (
            "could not transcribe a.wav" in undecodable["message"]
            and "car-rpc-audio-" not in undecodable["message"]
        )
        unknown = (await call(ws, "synthesize", {"text": "hi", "voice": "nosuch"}, rid=10))["error"]
        assert "has no voice 'nosuch'" in unknown["message"]
        # "auto" is the default only for model, voice and language: the text "auto" is spoken.
        spoken = (await call(ws, "synthesize", {"text": "auto", "voice": "auto"}, rid=11))["result"]
        assert spoken["audio"], spoken


async def test_voices_over_json_rpc(local_server: ServerThread) -> None:
    async with connect(local_server.ws_url) as ws:
        listed = (await call(ws, "voices", {}))["result"]
        assert listed["model"] == "piper/en_us-joe-medium" and listed["default"] == "en_US-joe-medium"
        assert [v["id"] for v in listed["voices"]] == ["en_US-joe-medium"]
        error = (await call(ws, "voices", {"model": 3}, rid=2))["error"]
        assert error["code"] == -32602 and error["data"]["param"] == "model"
        unknown = (await call(ws, "voices", {"model": "no-such-voice"}, rid=3))["error"]
        assert "no-such-voice" in unknown["message"]
