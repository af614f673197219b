"""``voxswap canary start|status|stop``: a canary or shadow rollout on a running server.

A thin client of ``/admin/models/NAME/canary`` (``/admin/model/canary`` for the default model):
``start`` answers once the candidate passed its gate and serves its share; ``--wait`` follows it
to its verdict, and the exit code says how it ended (0 promoted or passed, 1 otherwise), so a
script can go on only after a candidate earned it.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any
from urllib.parse import quote

import httpx

FINISHED_OK = ("promoted", "passed")
POLL_S = 1.0


class CanaryClient:
    def __init__(self, server: str, token: str, model: str | None):
        self.http = httpx.Client(base_url=server.rstrip("/"), timeout=600,
                                 headers={"Authorization": f"Bearer {token}"})
        self.path = "/admin/model/canary" if model is None else f"/admin/models/{quote(model, safe='')}/canary"

    def _answer(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300]
            raise CanaryFailed(f"{response.status_code}: {message}")
        data: dict[str, Any] = response.json()
        return data

    def start(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._answer(self.http.post(self.path, json={k: v for k, v in body.items() if v is not None}))

    def status(self) -> dict[str, Any]:
        return self._answer(self.http.get(self.path))

    def stop(self) -> dict[str, Any]:
        return self._answer(self.http.delete(self.path))

    def wait(self, *, timeout_s: float, on_tick: Any = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.status()
            if state["state"] not in ("staging", "running"):
                return state
            if on_tick is not None:
                on_tick(state)
            if time.monotonic() > deadline:
                raise CanaryFailed(f"the canary was still {state['state']} after {timeout_s:g} s")
            time.sleep(POLL_S)


class CanaryFailed(Exception):
    pass


def summary(state: dict[str, Any]) -> str:
    """One line: state, version, and each side's figures."""
    comparison = state.get("comparison") or {}
    sides = []
    for role in ("live", "candidate"):
        w = comparison.get(role)
        if w:
            sides.append(f"{role} {w['requests']} req, {w['error_rate']:.1%} errors, {w['empty_rate']:.1%} empty, "
                         f"p95 {w['p95_ms']} ms")
    shadow = comparison.get("shadow")
    if shadow:
        sides.append(f"shadow {shadow['compared']} compared, CER mean {shadow['cer_mean']}, "
                     f"{shadow['dropped']} dropped")
    reason = f" ({state['reason']})" if state.get("reason") else ""
    return f"{state['mode']} of {state['version']} on {state['model']}: {state['state']}{reason}; " + "; ".join(sides)


def run(command: str, client: CanaryClient, body: dict[str, Any], *, wait: bool, as_json: bool,
        timeout_s: float) -> int:
    with client.http:
        return _run(command, client, body, wait=wait, as_json=as_json, timeout_s=timeout_s)


def _run(command: str, client: CanaryClient, body: dict[str, Any], *, wait: bool, as_json: bool,
         timeout_s: float) -> int:
    try:
        if command == "start":
            state = client.start(body)
            print(summary(state), file=sys.stderr if as_json else sys.stdout)
            if wait:
                state = client.wait(timeout_s=timeout_s + state["duration_s"],
                                    on_tick=lambda s: print(summary(s), file=sys.stderr))
        elif command == "stop":
            state = client.stop()
        else:
            state = client.status()
    except (CanaryFailed, httpx.HTTPError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(state, indent=2) if as_json else summary(state))
    if command == "start" and wait:
        return 0 if state["state"] in FINISHED_OK else 1
    return 0
