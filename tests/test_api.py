"""The transcription, health, status and metrics routes, as a client sees them."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server.testing import synth
from tests.conftest import TEXT_A


def test_transcribe_returns_parsed_fields_and_version_headers(client: TestClient, speech_wav: bytes) -> None:
    r = client.post("/api/transcribe", files={"file": ("a.wav", speech_wav, "audio/wav")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == TEXT_A
    assert body["raw_text"].startswith("<|en|><|NEUTRAL|><|Speech|><|woitn|>")
    assert (body["language"], body["emotion"], body["events"]) == ("en", "neutral", ["speech"])
    assert body["model_version"] == "a" == r.headers["x-model-version"]
    assert body["duration_s"] == pytest.approx(1.5, abs=0.01)
    assert body["processing_ms"] > 0
    assert len(r.headers["x-request-id"]) >= 16


def test_language_and_itn_reach_the_model(client: TestClient, speech_wav: bytes) -> None:
    r = client.post("/api/transcribe", files={"file": ("a.wav", speech_wav)},
                    data={"language": "ja", "use_itn": "true"})
    body = r.json()
    assert body["language"] == "ja"
    assert body["text"] == "Model a says hello."
    assert "<|withitn|>" in body["raw_text"]


def test_silence_is_200_with_empty_text_and_nospeech(client: TestClient) -> None:
    r = client.post("/api/transcribe", files={"file": ("s.wav", synth.wav_bytes(synth.silence(2.0)))})
    assert r.status_code == 200
    assert r.json()["text"] == "" and r.json()["language"] == "nospeech"


def test_incoming_request_id_is_echoed(client: TestClient, speech_wav: bytes) -> None:
    r = client.post("/api/transcribe", files={"file": ("a.wav", speech_wav)}, headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"", 400, "empty_audio"),
        (b"this is a text file, not audio at all" * 20, 415, "unsupported_audio"),
        (synth.wav_bytes(synth.speech_like(1.0))[:30], 415, "unsupported_audio"),  # truncated inside the header
        (synth.wav_bytes(synth.speech_like(1.0))[:44], 400, "empty_audio"),  # a header and no samples
    ],
    ids=["empty", "not-audio", "truncated-wav", "header-only-wav"],
)
def test_bad_uploads_get_a_4xx_with_a_reason(client: TestClient, payload: bytes, status: int, code: str) -> None:
    r = client.post("/api/transcribe", files={"file": ("x.wav", payload)}, headers={"X-Request-Id": "req-bad"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["request_id"] == "req-bad"


def test_oversized_upload_is_refused_by_content_length_before_reading(make_settings) -> None:  # type: ignore[no-untyped-def]
    from server.app import create_app

    with TestClient(create_app(make_settings(max_upload_bytes=4096))) as c:
        big = synth.wav_bytes(synth.speech_like(3.0))
        r = c.post("/api/transcribe", files={"file": ("big.wav", big)})
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"
        assert "4096" in r.json()["error"]["message"]
        text = c.get("/metrics").text  # refused before routing, still counted under its route
        assert 'voxswap_requests_total{model="none",route="/api/transcribe",status="413",version="none"} 1.0' in text
        assert 'voxswap_rejected_requests_total{reason="too_large"} 1.0' in text


def test_too_long_audio_is_413(make_settings) -> None:  # type: ignore[no-untyped-def]
    from server.app import create_app

    with TestClient(create_app(make_settings(max_audio_seconds=2.0))) as c:
        r = c.post("/api/transcribe", files={"file": ("long.wav", synth.wav_bytes(synth.speech_like(3.0)))})
        assert r.status_code == 413 and r.json()["error"]["code"] == "audio_too_long"


def test_missing_file_and_bad_language_are_400(client: TestClient, speech_wav: bytes) -> None:
    r = client.post("/api/transcribe", data={"language": "en"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = client.post("/api/transcribe", files={"file": ("a.wav", speech_wav)}, data={"language": "klingon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "language"


def test_health_live_and_ready(client: TestClient) -> None:
    assert client.get("/health").json() == {
        "status": "healthy", "model_version": "a", "state": "ready",
        "models": {"sensevoice": {"ready": True, "version": "a", "state": "ready", "reason": "serving",
                                  "required": True}}}
    assert client.get("/health/live").status_code == 200
    assert client.get("/health/ready").status_code == 200


def test_status_reports_version_device_memory(client: TestClient) -> None:
    s = client.get("/api/system/status").json()
    assert s["model_loaded"] is True and s["model_version"] == "a"
    assert s["device"] == "cpu" and s["model_path"].endswith("/versions/a")
    assert s["resident_memory_bytes"] > 10 * 2**20
    assert s["registry_current"] == "a" and s["previous_version"] is None
    assert s["smoke"]["passed"] is True and s["smoke"]["golden"] is True


def test_metrics_count_requests_by_route_status_and_version(client: TestClient, speech_wav: bytes) -> None:
    client.post("/api/transcribe", files={"file": ("a.wav", speech_wav)})
    client.post("/api/transcribe", files={"file": ("x.wav", b"")})
    text = client.get("/metrics").text
    assert 'voxswap_requests_total{model="sensevoice",route="/api/transcribe",status="200",version="a"} 1.0' in text
    assert 'voxswap_requests_total{model="none",route="/api/transcribe",status="400",version="none"} 1.0' in text
    assert 'voxswap_model_active{model="sensevoice",version="a"} 1.0' in text
    assert "voxswap_request_duration_seconds_bucket" in text
    assert "voxswap_inference_duration_seconds_count" in text
    assert 'voxswap_model_load_duration_seconds_count{model="sensevoice"} 1.0' in text
    assert "voxswap_process_resident_memory_bytes" in text
    assert "voxswap_requests_in_flight 0.0" in text
    client.get("/api/jobs/0123456789abcdef0123456789abcdef")
    client.get("/healthz")
    client.get("/health/ready")
    text = client.get("/metrics").text
    assert 'route="/api/jobs/{job_id}",status="404"' in text  # the template, never one series per id
    assert 'voxswap_requests_total{model="none",route="unmatched",status="404",version="none"} 1.0' in text  # /healthz
    assert 'route="/health/ready"' not in text  # probes and scrapes are not traffic


def test_openai_route_json_text_and_pinning(client: TestClient, speech_wav: bytes) -> None:
    r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", speech_wav)}, data={"model": "whisper-1"})
    assert r.json() == {"text": TEXT_A}
    r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", speech_wav)},
                    data={"response_format": "text"})
    assert r.text == TEXT_A + "\n"
    r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", speech_wav)}, data={"model": "nope"})
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", speech_wav)}, data={"model": "b"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "version_not_loaded"
    for name in ("x" * 300, "../a", "."):  # not a version name at all: not found, never a 500
        r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", speech_wav)}, data={"model": name})
        assert r.status_code == 404 and r.json()["error"]["param"] == "model", (name, r.text)
        r = client.post("/api/transcribe", files={"file": ("a.wav", speech_wav)}, headers={"X-Model-Version": name})
        assert r.status_code == 404, (name, r.text)


def test_unknown_routes_use_the_error_envelope(client: TestClient) -> None:
    r = client.get("/no/such/route", headers={"X-Request-Id": "rid-404"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found" and r.json()["error"]["request_id"] == "rid-404"
