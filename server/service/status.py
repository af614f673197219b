"""What this process serves, model by model, and whether it is ready to take traffic.

Readiness is scoped: the models named by ``VOXSWAP_READY_MODELS`` (default: the default model and
every model with a current version), or one model (``/health/ready?model=NAME``). A broken
auxiliary model then takes only its own requests down, not the instance out of the load balancer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.errors import VoxswapError
from server.lifecycle.policy import ModelLifecycle
from server.service.context import AppContext


@dataclass
class Readiness:
    ready: bool
    reason: str
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


def model_ready(lifecycle: ModelLifecycle) -> tuple[bool, str]:
    if lifecycle.live is None:
        return False, lifecycle.not_ready_reason()
    lagging = lifecycle.convergence_problem()
    if lagging:
        return False, f"model {lifecycle.name!r}: {lagging}"
    return True, "serving"


def readiness(ctx: AppContext, model: str | None = None) -> Readiness:
    """Ready when every required model serves here and every worker has converged on it."""
    lifecycles = {m.name: m for m in ctx.models}
    if model is not None:
        required = [ctx.models.get(model).name]  # 404 for an unknown model
    elif ctx.settings.ready_models is not None:
        required = list(ctx.settings.ready_models)
    else:
        required = [m.name for m in ctx.models if m is ctx.models.default or m.registry.state().current]
    answer = Readiness(True, "serving")
    for name, lifecycle in lifecycles.items():
        ok, reason = model_ready(lifecycle)
        answer.models[name] = {"ready": ok, "version": lifecycle.live_version, "state": lifecycle.state.value,
                               "reason": reason, "required": name in required}
    problems = [answer.models[n]["reason"] if n in lifecycles else f"no model {n!r} (VOXSWAP_READY_MODELS)"
                for n in required if n not in lifecycles or not answer.models[n]["ready"]]
    if ctx.shutting_down:
        answer.ready, answer.reason = False, "shutting down"
    elif problems:
        answer.ready, answer.reason = False, "; ".join(problems)
    return answer


def model_status(ctx: AppContext, lifecycle: ModelLifecycle) -> dict[str, Any]:
    """One model as ``GET /admin/models`` and ``/api/system/status`` show it."""
    live = lifecycle.live
    state = lifecycle.registry.state()
    ready, reason = model_ready(lifecycle)
    rollout = lifecycle.board.rollout()
    return {
        "name": lifecycle.name,
        "kind": (kind := lifecycle.registry.kind()) and kind.value,
        "default": lifecycle is ctx.models.default,
        "ready": ready,
        "reason": reason,
        "state": lifecycle.state.value,
        "live_version": live.version if live else None,
        "previous_version": state.previous,
        "registry_current": state.current,
        "registry_generation": state.generation,
        "held": state.held,
        "swapping": lifecycle.swapping,
        "last_error": lifecycle.last_error,
        "in_flight": lifecycle.in_flight(),
        "model_memory_bytes": live.memory_bytes if live else 0,
        "model_path": str(live.path) if live else None,
        "model_file": live.engine.model_file if live else None,
        "device": live.engine.device if live else ctx.settings.device,
        "providers": live.engine.providers if live else [],
        "sessions": [dict(session) for session in live.engine.sessions] if live else [],
        "generated": _generated(lifecycle),
        "smoke": live.smoke.to_json() if live else None,
        "versions": [m.name for m in lifecycle.registry.versions()],
        "loaded_versions": lifecycle.loaded_versions(),
        "workers": [w.to_json() for w in lifecycle.board.workers()],
        "rollout": rollout.to_json() if rollout else None,
        "watch": lifecycle.watch.current(),
    }


def _generated(lifecycle: ModelLifecycle) -> bool:
    """The live version, else the current one, is a generated stand-in (its graph or its manifest says so)."""
    live = lifecycle.live
    if live is not None:
        return live.engine.metadata.get("voxswap_test_model") == "1"
    current = lifecycle.registry.state().current
    try:
        return bool(current and lifecycle.registry.manifest(current).metadata.get("generated"))
    except VoxswapError:
        return False
