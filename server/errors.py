"""One exception hierarchy and one error envelope for every failure a client can see.

The envelope is OpenAI's (``message``, ``type``, ``param``, ``code``) plus ``request_id``, so the
OpenAI client and curl users both get something they can read and quote in a bug report.
"""

from __future__ import annotations


class VoxswapError(Exception):
    """Base class: carries the HTTP status and a stable machine-readable code."""

    status_code = 500
    code = "internal_error"
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after


class InvalidRequest(VoxswapError):
    status_code = 400
    code = "invalid_request"
    type = "invalid_request_error"


class EmptyAudio(InvalidRequest):
    code = "empty_audio"


class AudioTooShort(InvalidRequest):
    code = "audio_too_short"


class CommitEmpty(InvalidRequest):
    """A realtime commit with no turn to commit (OpenAI's code for it)."""

    code = "input_audio_buffer_commit_empty"


class PayloadTooLarge(VoxswapError):
    status_code = 413
    code = "payload_too_large"
    type = "invalid_request_error"


class AudioTooLong(PayloadTooLarge):
    code = "audio_too_long"


class UnsupportedAudio(VoxswapError):
    status_code = 415
    code = "unsupported_audio"
    type = "invalid_request_error"


class RequestTimeout(VoxswapError):
    """The client sent its request body too slowly (stalled, or under the minimum rate)."""

    status_code = 408
    code = "request_timeout"
    type = "invalid_request_error"


class Unauthorized(VoxswapError):
    status_code = 401
    code = "unauthorized"
    type = "authentication_error"


class Forbidden(VoxswapError):
    status_code = 403
    code = "forbidden"
    type = "permission_error"


class NotFound(VoxswapError):
    status_code = 404
    code = "not_found"
    type = "invalid_request_error"


class Conflict(VoxswapError):
    status_code = 409
    code = "conflict"
    type = "invalid_request_error"


class SwapInProgress(Conflict):
    code = "swap_in_progress"


class UnexpectedCurrent(Conflict):
    code = "unexpected_current"


class VersionNotLoaded(Conflict):
    code = "version_not_loaded"


class JobNotFinished(Conflict):
    code = "job_not_finished"


class SwapFailed(VoxswapError):
    """A version was refused (load, verification or smoke failed); the old one keeps serving."""

    status_code = 422
    code = "swap_failed"
    type = "invalid_request_error"

    def __init__(self, message: str, *, outcome: str, report: dict[str, object] | None = None):
        super().__init__(message)
        self.outcome = outcome
        self.report = report or {}


class TooManyRequests(VoxswapError):
    """A per-client limit was reached; ``retry_after`` says when to try again."""

    status_code = 429
    code = "too_many_requests"
    type = "rate_limit_error"


class TooManyPendingJobs(TooManyRequests):
    code = "too_many_pending_jobs"


class NotReady(VoxswapError):
    status_code = 503
    code = "not_ready"
    type = "server_error"


class Overloaded(NotReady):
    code = "overloaded"


class InferenceTimeout(VoxswapError):
    status_code = 504
    code = "inference_timeout"
    type = "server_error"


class InsufficientStorage(VoxswapError):
    """The data dir's budget for job files is spent: the submission is refused whole, nothing kept."""

    status_code = 507
    code = "insufficient_storage"
    type = "server_error"


class RegistryError(VoxswapError):
    """Something about the registry on disk is wrong (bad name, missing files, checksum)."""

    status_code = 400
    code = "registry_error"
    type = "invalid_request_error"


class VerificationFailed(RegistryError):
    code = "verification_failed"
    status_code = 422


def envelope(
    message: str, *, type_: str, code: str, request_id: str | None, param: str | None = None
) -> dict[str, object]:
    return {
        "error": {
            "message": message,
            "type": type_,
            "param": param,
            "code": code,
            "request_id": request_id,
        }
    }
