"""Rolling upgrades behind nginx while clients stream speech into /v1/realtime: no turn is lost.

Two gunicorn instances (two workers each) behind the repository's nginx config, and four clients
speaking utterances at real-time pace through nginx without pause. First ``deploy.sh`` swaps each
instance in place: sessions stay open, and each turn is transcribed by the version that was live
when it began, so a session's transcripts switch from the old version to the new one. Then each
instance is restarted in turn onto a newer version, as an image upgrade does: its sessions finish
their turns, close with 1012, and reconnect through nginx (a draining instance refuses the
handshake with 503, so nginx sends it to the other one). Either way every utterance is
transcribed exactly once, and no turn fails.

Run alone with ``pytest -m long tests/e2e/test_realtime_deploy.py``.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server.storage.registry import Registry
from testkit.harness import wait_until
from testkit.nginx import nginx_binary, run_nginx
from testkit.processes import ServerProcess, start_server
from testkit.realtime import SERVICE_RESTART, RealtimeLoad, Speaker

pytestmark = [pytest.mark.e2e, pytest.mark.deploy, pytest.mark.long,
              pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")]
ROOT = Path(__file__).resolve().parents[2]
TEXT = {"a": "stream model a", "b": "stream model b", "c": "stream model c"}
ENV = {"VOXSWAP_SHUTDOWN_DELAY_S": "1", "VOXSWAP_DRAIN_TIMEOUT_S": "15"}


@dataclass
class Fleet:
    instances: list[ServerProcess]
    registries: list[Registry]
    lb: str
    models: dict[str, Path]
    workdir: Path

    def deploy(self, version: str) -> subprocess.CompletedProcess[str]:
        args = [str(ROOT / "deploy.sh"), "--instances", ",".join(i.url for i in self.instances), "--version", version,
                "--model-dir", str(self.models[version]), "--token", self.instances[0].token,
                "--watch-seconds", "2", "--timeout", "120"]
        return subprocess.run(args, capture_output=True, text=True, timeout=600)

    def restart(self, n: int, version: str) -> None:
        """Stop instance ``n`` gracefully, make ``version`` its registry's current one, start it again."""
        old = self.instances[n]
        old.proc.send_signal(signal.SIGTERM)
        assert old.proc.wait(60) == 0, old.log()
        registry = self.registries[n]
        if version not in [m.name for m in registry.versions()]:
            registry.add(self.models[version], version)
        registry.promote(version)
        self.instances[n] = start_server(registry.root, self.workdir / f"instance{n}", workers=2, port=old.port,
                                         env=ENV)

    def worker_versions(self) -> list[str | None]:
        return [v for i in self.instances for v in i.worker_versions().values()]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[..., Path]) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("realtime-fleet")
    models = {v: model_dir(text, compute_ms=10) for v, text in TEXT.items()}
    instances: list[ServerProcess] = []
    registries: list[Registry] = []
    try:
        for n in range(2):
            registry = Registry(root / f"registry{n}").ensure()
            registry.add(models["a"], "a")
            registry.promote("a")
            registries.append(registry)
            instances.append(start_server(registry.root, root / f"instance{n}", workers=2, env=ENV))
        with run_nginx(ROOT / "deploy" / "nginx.conf", [i.port for i in instances], root / "nginx") as lb:
            yield Fleet(instances, registries, lb, models, root)
    finally:
        for instance in instances:
            instance.stop()


def said_by(version: str | None, transcript: str | None) -> bool:
    """The stand-in model says its text for each piece of a turn: once or more, nothing else."""
    text = TEXT.get(version or "")
    return text is not None and transcript is not None and re.fullmatch(rf"{text}( {text})*", transcript) is not None


def switches_once(versions: list[str | None], old: str, new: str) -> bool:
    """``old`` turns, then ``new`` ones, never back (either run may be empty)."""
    return versions == sorted(versions, key=lambda v: v != old) and set(versions) <= {old, new}


def completed_since(speaker: Speaker, count: int) -> Callable[[], bool]:
    return lambda: len(speaker.completed()) >= count


def audit(load: RealtimeLoad) -> None:
    """Every speaker's every utterance transcribed exactly once, by the version that served it."""
    assert [p for s in load.speakers for p in s.problems()] == []
    for speaker in load.speakers:
        for turn in speaker.started_turns():
            assert said_by(turn.version, turn.transcript), (speaker.name, turn.version, turn.transcript)
            assert "".join(turn.deltas) == turn.transcript


def test_1_deploy_sh_swaps_each_instance_under_streaming_load_without_closing_a_session_or_losing_a_turn(
    fleet: Fleet,
) -> None:
    with RealtimeLoad(fleet.lb, clients=4) as load:
        for speaker in load.speakers:
            wait_until(completed_since(speaker, 1), timeout_s=60, message=f"{speaker.name}'s first turn")
        result = fleet.deploy("b")
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert out.count("uploading b") == 2 and len(re.findall(r"watch (passed|inconclusive)", out)) == 2, out
        after = {s.name: len(s.completed()) for s in load.speakers}
        for speaker in load.speakers:  # every session goes on speaking, and is heard, after the deploy
            wait_until(completed_since(speaker, after[speaker.name] + 2), timeout_s=60,
                       message=f"{speaker.name}'s turns after the deploy")
    assert fleet.worker_versions() == ["b"] * 4
    audit(load)
    for speaker in load.speakers:
        assert len(speaker.connections) == 1, speaker.name  # an in-place swap closes no session
        assert switches_once(speaker.versions(), "a", "b"), (speaker.name, speaker.versions())
        assert speaker.versions()[-1] == "b", (speaker.name, speaker.versions())
    assert {v for s in load.speakers for v in s.versions()} == {"a", "b"}


def test_2_a_rolling_restart_onto_a_new_version_reconnects_every_session_on_1012_and_loses_no_turn(
    fleet: Fleet,
) -> None:
    with RealtimeLoad(fleet.lb, clients=4) as load:
        for speaker in load.speakers:
            wait_until(completed_since(speaker, 1), timeout_s=60, message=f"{speaker.name}'s first turn")
        for n in range(len(fleet.instances)):
            fleet.restart(n, "c")
        after = {s.name: len(s.completed()) for s in load.speakers}
        for speaker in load.speakers:  # every session goes on speaking, and is heard, after the restarts
            wait_until(completed_since(speaker, after[speaker.name] + 2), timeout_s=60,
                       message=f"{speaker.name}'s turns after the restarts")
    assert fleet.worker_versions() == ["c"] * 4
    audit(load)
    for speaker in load.speakers:
        # every instance was restarted, so every session was closed by a drain at least once
        assert len(speaker.connections) >= 2, speaker.name
        assert [c.close_code for c in speaker.connections[:-1]] == [SERVICE_RESTART] * (len(speaker.connections) - 1)
        assert speaker.connections[-1].close_code == 1000  # the client's own close, at the end
        # what was spoken on each new session was heard there: the utterances go on without a gap
        for connection in speaker.connections[1:]:
            spoken = [u for u, c, whole in speaker.spoken if c == connection.index and whole]
            heard = [t.utterance for t in speaker.started_turns() if t.connection == connection.index and t.completed]
            assert set(spoken) <= set(heard), (speaker.name, connection.index, spoken, heard)
        assert switches_once(speaker.versions(), "b", "c"), (speaker.name, speaker.versions())
        assert speaker.versions()[-1] == "c"
