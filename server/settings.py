"""Every knob of voxswap in one place: environment (``VOXSWAP_*``), CLI flags, or code.

Budgets are explicit: workers x inference threads x onnxruntime intra-op threads should fit the
cores; drain, upload and audio limits are settings rather than constants buried in handlers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, IPvAnyNetwork, SecretStr
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _jobs_url(url: SecretStr | None) -> SecretStr | None:
    """Only the scheme is checked here, and the error names only it: the URL holds a password."""
    if url is not None:
        scheme = url.get_secret_value().partition(":")[0].lower()
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(f"must start with sqlite:/// or postgresql:// (got {scheme[:20]!r})")
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VOXSWAP_", extra="ignore")

    registry: Path = Path("model_registry")
    """Model registry folder: versions, state.json and history.jsonl live here."""

    default_model: str = Field("sensevoice", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    """Name of the model the registry folder itself holds (the single-model layout of earlier
    releases); other models live under ``models/NAME/``. Requests that name no model, the aliases
    ``default``/``whisper-1``/``voxswap`` and the ``/admin/model/*`` routes use it."""

    ready_models: Annotated[tuple[str, ...] | None, NoDecode,
                            BeforeValidator(lambda v: tuple(v.replace(",", " ").split()) if isinstance(v, str) else v)
                            ] = None
    """Models that must serve for ``/health/ready`` to answer 200 (comma-separated). Unset: every
    model that has a current version. A broken auxiliary model then need not take the instance out
    of its load balancer; ``/health/ready?model=NAME`` asks about one model."""

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

    session_spin_wait: bool = False
    """Let onnxruntime's intra-op threads spin between work instead of sleeping. Off: on a host
    whose cores are shared (several workers, decoding, other models) spinning burns CPU that
    requests need; on for a host dedicated to one model where latency matters most."""

    prepare_on_add: bool = True
    """At ``registry add`` and upload, prepare the graphs this host loads (optimised by onnxruntime,
    weights in a mapped external file) beside the original files, so a swap maps the weights
    instead of copying them and skips graph optimisation. Costs one full load at add."""

    prepare_on_load: bool = True
    """When a version has no usable prepared graph for this host (added before them, made for
    another onnxruntime version or CPU, or damaged), prepare it again from the original before
    loading it. Off: load the original (as earlier releases did) and leave the folder untouched."""

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

    segment_window_s: float = Field(30.0, ge=5.0, le=300.0)
    """Audio longer than this is cut at pauses into segments of at most this length."""

    segment_batch_size: int = Field(4, ge=1, le=64)
    """Segments of one long file run through the model together (memory grows with it)."""

    batch_max_size: int = Field(1, ge=1, le=64)
    """Requests that arrive together are run as one session call, up to this many (1: no batching,
    the default: on 2 cores with SenseVoice-small's cost a batch of 8 gave 0.89x the throughput, while
    a cheap model's requests gained 1.36x; see docs/benchmarks.md, section 11). Each answer still
    names the version that computed it; a batch never mixes versions."""

    batch_wait_ms: float = Field(5.0, ge=0, le=100)
    """An incomplete batch waits this long for more, only while requests have been arriving closer
    together than this (at low load a lone request never waits)."""

    drain_timeout_s: float = Field(30.0, ge=0)
    """How long a swap or unload waits for requests still running on the old version."""

    smoke_cer_threshold: float = Field(0.1, ge=0, le=1)
    """A smoke clip passes when the character error rate of its transcript is at most this."""

    smoke_latency_budget_s: float = Field(10.0, gt=0)
    """A smoke clip that takes longer than this fails the smoke test."""

    watch_interval_s: float = Field(0.2, gt=0)
    """How often the server stats state.json to follow promotions made by the CLI or peers."""

    data_dir: Path = Path("data")
    """Batch jobs live here: jobs.sqlite3 plus each job's uploaded audio and result. Share it
    between the processes of one host; each job is claimed by exactly one of them."""

    jobs_url: Annotated[SecretStr | None, AfterValidator(_jobs_url)] = None
    """Where the job queue lives: unset (SQLite in ``data_dir``, one machine), ``sqlite:///dir``, or
    ``postgresql://user:pass@host/db`` for a fleet sharing one queue (a secret: never shown)."""

    jobs_blob_limit_bytes: int = Field(64 * 1024**2, ge=1024, le=1024**3)
    """With PostgreSQL, each job's audio is kept in the database up to this size (bytea; larger
    recordings get 413). SQLite keeps audio as files, bounded by ``max_upload_bytes`` only."""

    job_workers: int = Field(1, ge=0, le=64)
    """Batch jobs one process runs at once (0: this process only accepts and serves jobs)."""

    job_poll_s: float = Field(0.5, gt=0, le=60)
    """How often an idle job worker looks for pending jobs (submissions here wake it at once)."""

    job_max_attempts: int = Field(3, ge=1, le=100)
    """A job whose process died under it this many times is failed instead of run again."""

    max_pending_jobs: int = Field(10_000, ge=1)
    """Jobs allowed to wait; a submission beyond this gets 503."""

    job_retention_s: float = Field(7 * 24 * 3600.0, gt=0)
    """Finished jobs (and their audio and results) are deleted this long after they finished."""

    webhook_attempts: int = Field(5, ge=1, le=20)
    """Tries to deliver a job's webhook before giving up."""

    webhook_backoff_s: float = Field(1.0, gt=0, le=600)
    """Wait before the first webhook retry; doubled after each failed try."""

    webhook_timeout_s: float = Field(10.0, gt=0, le=120)
    """Time limit for one webhook request."""

    log_level: str = "INFO"
    """Root log level."""

    log_format: Literal["text", "json"] = "text"
    """Log line format."""

    log_file: Path | None = None
    """Also write logs to this file, rotated at ``log_max_mb`` keeping ``log_backups`` old files."""

    log_max_mb: float = Field(20.0, gt=0)
    """Size at which the log file is rotated."""

    log_backups: int = Field(5, ge=0)
    """Rotated log files kept."""

    fault_injection: bool = False
    """Test-only: honour the registry's faults/ hooks (a worker that fails its load). Never in production."""

    rollout_timeout_s: float = Field(120.0, gt=0)
    """How long a coordinated update waits for every worker to stage, then to serve, the version."""

    convergence_grace_s: float = Field(30.0, gt=0)
    """Readiness turns 503 when a worker still serves another version this long after a commit."""

    heartbeat_interval_s: float = Field(1.0, gt=0)
    """How often each process publishes its heartbeat (version, state, memory) next to the registry."""

    shutdown_delay_s: float = Field(5.0, ge=0)
    """On SIGTERM, readiness turns 503 at once and the process keeps serving this long before it stops
    accepting, so a load balancer notices first."""

    realtime_max_sessions: int = Field(16, ge=0, le=10_000)
    """Realtime WebSocket sessions one process holds; the handshake beyond them is an HTTP 503."""

    realtime_max_turn_s: float = Field(30.0, ge=2.0, le=300.0)
    """A turn (one utterance) longer than this is committed by the server, as if the speaker paused."""

    realtime_idle_timeout_s: float = Field(60.0, gt=0)
    """A realtime session that sends nothing this long is closed (1000, with the reason)."""

    realtime_max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest client message on a realtime WebSocket (one append of 15 s of 24 kHz PCM is 960 KB)."""

    realtime_segment_s: float = Field(2.0, ge=0.5, le=30.0)
    """While speech goes on, the open part of a turn is decoded and sent as a delta once it is this
    long, cut at its quietest point; a delta is final for the words it holds, never revised."""

    worker_timeout_s: int = Field(120, ge=10)
    """gunicorn's worker timeout; must cover loading the model at worker start."""

    memory_budget_mb: int = Field(0, ge=0)
    """After a swap, a worker whose resident memory exceeds this is recycled gracefully, one at a time
    (0: off). onnxruntime and glibc do not always give freed memory back."""

    watch_seconds: float = Field(0.0, ge=0)
    """After a swap, compare the new version with the previous one this long and roll back by itself
    if it is worse (0: off unless an update asks for it)."""

    watch_min_requests: int = Field(10, ge=1)
    """A watch judges only after the new version has answered at least this many requests."""

    watch_max_error_rate_increase: float = Field(0.05, ge=0, le=1)
    """Roll back when the new version's error rate exceeds the previous one's by more than this."""

    watch_max_empty_rate_increase: float = Field(0.2, ge=0, le=1)
    """Roll back when the share of empty transcripts grows by more than this."""

    watch_max_latency_ratio: float = Field(2.0, ge=1)
    """Roll back when the new version's p95 latency exceeds the previous one's by this factor."""

    # -- canary and shadow rollouts --

    canary_mode: Literal["canary", "shadow"] = "canary"
    """A canary answers ``canary_percent`` of clients from the candidate; shadow answers everyone from
    the live version and also runs that share of requests on the candidate, off the request path."""

    canary_percent: float = Field(10.0, gt=0, le=100)
    """Share of clients (canary) or requests (shadow) that reach the candidate."""

    canary_duration_s: float = Field(300.0, gt=0, le=86_400)
    """How long a canary or shadow runs before it is judged."""

    canary_on_pass: Literal["promote", "hold"] = "hold"
    """What a passed canary does: promote the candidate (a normal blue/green flip, already loaded), or
    hold: record the verdict, unload the candidate and leave the promotion to an operator."""

    canary_min_requests: int = Field(20, ge=1)
    """Each side (live and candidate) must answer at least this many requests in the window, or the
    verdict is ``inconclusive`` and nothing is promoted."""

    canary_max_error_rate_increase: float = Field(0.02, ge=0, le=1)
    canary_max_empty_rate_increase: float = Field(0.1, ge=0, le=1)
    canary_max_latency_ratio: float = Field(1.5, ge=1)
    """A candidate fails when its error rate or empty share exceeds the live version's by more than
    these, or its p95 latency is this many times the live one's, over the same window."""

    canary_max_cer_mean: float = Field(0.15, ge=0, le=10)
    """Shadow: a candidate fails when its transcripts differ from the live ones by this mean
    character error rate or more."""

    canary_cer_threshold: float = Field(0.3, ge=0, le=10)
    canary_max_cer_share: float = Field(0.2, ge=0, le=1)
    """Shadow: a candidate also fails when more than ``canary_max_cer_share`` of the compared
    transcripts differ by more than ``canary_cer_threshold``."""

    shadow_queue: int = Field(8, ge=1, le=10_000)
    """Mirrored requests waiting for the candidate; beyond it they are dropped (and counted), never
    delaying live answers."""

    trusted_proxies: Annotated[
        tuple[IPvAnyNetwork, ...], NoDecode,
        BeforeValidator(lambda v: tuple(v.replace(",", " ").split()) if isinstance(v, str) else v),
    ] = Field(("127.0.0.1/32",), max_length=100)  # type: ignore[arg-type]
    """Peers (CIDRs, comma-separated) whose ``X-Forwarded-For`` names the client (uvicorn's
    ``forwarded_allow_ips``; by default a proxy on this host, as uvicorn's default). Empty: none, and
    the peer is the client. A canary keeps each client on one side by its ``X-Canary-Key``, else by
    this address."""

    # -- webhooks and job ownership (issue 18: findings C and D) --

    webhook_allow_networks: Annotated[
        tuple[IPvAnyNetwork, ...], NoDecode,
        BeforeValidator(lambda v: tuple(v.replace(",", " ").split()) if isinstance(v, str) else v),
    ] = Field((), max_length=100)
    """Networks (CIDRs, comma-separated, e.g. ``10.1.0.0/16,fd00::/8``) that webhooks may reach although
    they are loopback, private, link-local or reserved. Empty: webhooks go only to public addresses, so
    a client cannot use the server to reach what stands behind it (cloud metadata, admin ports)."""

    webhook_secret: SecretStr | None = Field(None, min_length=16, max_length=4096)
    """Key of the HMAC-SHA256 signature on every webhook delivery (``X-Voxswap-Signature``). Unset: one
    is generated once and kept in ``<data_dir>/webhook-secret`` (mode 0600), shared by the processes
    of that data dir, so deliveries are always signed."""

    max_pending_jobs_per_key: int = Field(0, ge=0, le=1_000_000)
    """Jobs one client API key may have waiting; beyond this a submission gets 429 with Retry-After
    (0: off). Clients without a key share ``max_pending_jobs`` only."""

    # -- client keys, request bodies and slow clients (issue 18: findings A, D's keys and F) --

    api_keys_file: Path | None = None
    """Client API keys, one a line: the key itself or ``sha256:<hex>`` of it, then optionally a label
    (``#`` comments). Set, transcription, /v1/models and jobs need ``Authorization: Bearer <key>``;
    the file is re-read within a second of a change. Unset (default): those routes are open."""

    api_key_rate_per_s: float = Field(0.0, ge=0, le=100_000)
    """Requests per second one client API key may make (a token bucket per key and process; 0: off).
    Beyond it the answer is 429 with Retry-After."""

    api_key_burst: int = Field(10, ge=1, le=100_000)
    """Requests one key may make at once before ``api_key_rate_per_s`` paces it."""

    max_body_bytes: int = Field(64 * 1024, ge=1024, le=64 * 1024 * 1024)
    """Largest body of any request that is not an upload (admin JSON and the like); bigger gets 413
    before it is read. Uploads are bounded by ``max_upload_bytes``."""

    header_timeout_s: float = Field(10.0, gt=0, le=600)
    """A connection whose request headers are not complete this long after it opened (or after its
    first byte of a new request) is closed."""

    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    """A request body that sends nothing for this long gets 408 and its connection is closed."""

    min_upload_rate_bytes: int = Field(1024, ge=0, le=1024**3)
    """Once a body has taken ``body_timeout_s``, it must average at least this many bytes a second,
    or it gets 408 (0: off). Stops a client that trickles a byte now and then."""

    max_connections: int = Field(500, ge=1, le=100_000)
    """Open connections one process keeps. Beyond it a new connection pushes out the oldest one that
    is not in a request, or, when all are, gets 503 and is closed at once. At start the soft
    open-files limit is raised to fit (within the hard limit), so descriptors never run out."""

    keepalive_timeout_s: int = Field(5, ge=1, le=600)
    """An idle keep-alive connection is closed after this many seconds."""

    # -- what the public port shows (issue 18: docs, status) --

    public_docs: bool = True
    """Serve the API's documentation (``/docs`` and ``/openapi.json``) to anyone. False: neither is
    mounted and both answer 404, so a scanner learns nothing of the admin routes from the port."""

    public_status: bool = True
    """Anyone may read ``/api/system/status`` (versions, memory, workers, the registry's path). False:
    it answers 404 unless the request carries the admin token; the operator page then sends it."""

    # -- zips and disk (issue 18: finding E) --

    zip_max_entries: int = Field(1000, ge=1, le=100_000)
    """Entries the zips of one job submission may hold in all (folders and skipped files count too);
    more is 413, judged from the zip's directory before anything is unpacked."""

    zip_max_unpacked_bytes: int = Field(200 * 1024 * 1024, ge=1024, le=2**40)
    """Bytes the recordings in the zips of one job submission may unpack to in all; more is 413
    before anything is unpacked. Each recording is also bounded by ``max_upload_bytes``."""

    zip_max_ratio: float = Field(20.0, ge=1.0, le=10_000.0)
    """Largest unpacked/compressed ratio of a zip's recordings (speech in WAV deflates about 1.2:1,
    a zip bomb 1000:1); more is 413 before anything is unpacked. The first MB unpacked is free."""

    data_dir_budget_bytes: int = Field(20 * 1024**3, ge=0, le=2**50)
    """Bytes that job inputs and results may take in ``data_dir``, counted as jobs come and go; a
    submission that would exceed it gets 507 until jobs are deleted or expire (0: no budget)."""

    def admin_token_value(self) -> str | None:
        return self.admin_token.get_secret_value() if self.admin_token else None
