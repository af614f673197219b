"""Every knob of voxswap in one place: environment (``VOXSWAP_*``), CLI flags, or code.

Budgets are explicit: workers x inference threads x onnxruntime intra-op threads should fit the
cores; drain, upload and audio limits are settings rather than constants buried in handlers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOXSWAP_", extra="ignore")

    registry: Path = Path("model_registry")
    """Model registry folder: versions, state.json and history.jsonl live here."""

    host: str = "127.0.0.1"
    """Interface to listen on."""

    port: int = Field(7860, ge=0, le=65535)
    """TCP port to listen on (0 picks a free one)."""

    workers: int = Field(1, ge=1, le=64)
    """Server processes. 1 runs uvicorn alone; more run gunicorn with uvicorn workers."""

    admin_token: SecretStr | None = None
    """Bearer token for /admin. With none set, the admin API answers 403 and says how to set it."""

    seed_demo: bool = True
    """When the registry is empty at start, add and promote a generated demo model (not real ASR)."""

    device: str = "cpu"
    """'cpu', or 'cuda' / 'cuda:N' to ask onnxruntime-gpu for that GPU (falls back to CPU)."""

    intra_op_threads: int = Field(2, ge=1, le=64)
    """onnxruntime intra-op threads per model session."""

    prefer_quantized: bool = True
    """Use model_quant.onnx when a version has both it and model.onnx."""

    inference_workers: int = Field(1, ge=1, le=64)
    """Inference threads per process: how many requests run the model at once."""

    max_queue: int = Field(16, ge=0, le=10_000)
    """Requests allowed to wait for an inference thread; beyond this the answer is 503."""

    inference_timeout_s: float = Field(120.0, gt=0)
    """A request whose inference takes longer is answered 504."""

    max_upload_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    """Largest accepted upload; bigger ones get 413 before the body is read."""

    max_audio_seconds: float = Field(600.0, gt=0)
    """Longest accepted audio after decoding; longer gets 413."""

    drain_timeout_s: float = Field(30.0, ge=0)
    """How long a swap or unload waits for requests still running on the old version."""

    smoke_cer_threshold: float = Field(0.1, ge=0, le=1)
    """A smoke clip passes when the character error rate of its transcript is at most this."""

    smoke_latency_budget_s: float = Field(10.0, gt=0)
    """A smoke clip that takes longer than this fails the smoke test."""

    watch_interval_s: float = Field(0.2, gt=0)
    """How often the server stats state.json to follow promotions made by the CLI or peers."""

    log_level: str = "INFO"
    """Root log level."""

    log_format: Literal["text", "json"] = "text"
    """Log line format."""

    fault_injection: bool = False
    """Test-only: honour VOXSWAP_FAULT_* hooks. Never enable in production."""

    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token else None
