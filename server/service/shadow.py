"""Shadow traffic: a share of live requests also run on a canary's candidate, off the request path.

The live answer is already on its way when a mirror is queued; the candidate's transcript is only
compared with it (character error rate) and its outcome counted for the verdict. Mirrors run on one
thread of low CPU priority, outside the inference pool's admission (they never take a live request's
slot), behind a bounded queue: when the candidate cannot keep up, mirrors are dropped and counted,
never waited for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.typing import NDArray

from server.lifecycle.policy import ModelLifecycle
from server.speech.richtext import char_error_rate

log = logging.getLogger("voxswap.shadow")
NICE = 10  # the shadow thread yields the cores to live requests


class ShadowRunner:
    def __init__(self, queue: int, run: Callable[..., tuple[str, float]]):
        """``run(lifecycle, version, samples, language, use_itn)`` -> (text, inference seconds)."""
        self._run = run
        self._slots = threading.BoundedSemaphore(queue + 1)  # waiting ones, and the one running
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="voxswap-shadow", initializer=_lower_priority)

    def submit(self, lifecycle: ModelLifecycle, canary_id: str, version: str, samples: NDArray[np.float32],
               language: str, use_itn: bool, live_text: str) -> None:
        if not self._slots.acquire(blocking=False):
            lifecycle.canary.tally.add(canary_id, dropped=True)
            lifecycle.metrics.shadow("dropped")
            return
        try:
            self._executor.submit(self._mirror, lifecycle, canary_id, version, samples, language, use_itn, live_text)
        except RuntimeError:  # shutting down
            self._slots.release()

    def _mirror(self, lifecycle: ModelLifecycle, canary_id: str, version: str, samples: NDArray[np.float32],
                language: str, use_itn: bool, live_text: str) -> None:
        try:
            text, elapsed = self._run(lifecycle, version, samples, language, use_itn)
        except Exception as exc:  # the candidate failed (or went away): its failure, never the live answer's
            lifecycle.stats.record(version, ok=False, empty=False, latency_s=0.0)
            lifecycle.canary.tally.add(canary_id, failed=True)
            lifecycle.metrics.shadow("failed")
            log.debug("shadow request failed", extra={"event": "shadow_failed", "model": lifecycle.name,
                                                      "version": version, "reason": str(exc)})
            return
        finally:
            self._slots.release()
        lifecycle.stats.record(version, ok=True, empty=not text, latency_s=elapsed)
        lifecycle.canary.tally.add(canary_id, cer=char_error_rate(live_text, text))
        lifecycle.metrics.shadow("mirrored")

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _lower_priority() -> None:
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)  # Linux: this thread only
