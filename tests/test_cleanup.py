"""What a crash leaves on disk is removed by ownership, never by age.

Issue 18's trials killed adds and uploads and found model-sized staging folders (277 MB, 912 MB),
``voxswap-upload-*`` folders in /tmp and an orphaned ``.state.json.*.tmp`` that nothing ever
removed; and the age test meant to find them (1 h, judged by a modification time that ``copytree``
copies from the source) once deleted an add still in progress. Here real processes are killed with
SIGKILL, and live ones are paused with SIGSTOP, however old they look: a paused process still owns
what it works on, and is what a slow add on a busy disk looks like.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.storage.files import write_json_atomic
from server.storage.job_store import JobStore
from server.storage.registry import Registry
from testkit.harness import wait_until
from tests.conftest import AUTH
from tests.jobs_helpers import server_process

BIG_MB = 300  # copying and hashing this takes a few hundred ms: long enough to be caught mid-way
VOXSWAP = [sys.executable, "-m", "server"]
# A writer that stops half way through an atomic replace and waits to be told to finish (or killed).
HALF_WRITTEN = """
import sys
from pathlib import Path
from server.storage.files import atomic_replace
with atomic_replace(Path(sys.argv[1])) as fh:
    fh.write(sys.argv[2])
    fh.flush()
    print("writing", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; any still there at the end are killed."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.communicate(timeout=30)  # reaps it and closes its pipes


def staging_of(registry: Registry, name: str) -> Path | None:
    """The folder an ``add`` of ``name`` builds the version in, once it exists."""
    found = [p for p in registry.staging_dir.glob(f"{name}.*") if p.is_dir()]
    return found[0] if found else None


def start_add(registry: Registry, src: Path, name: str, processes: list[subprocess.Popen[str]]) -> Path:
    """``voxswap registry add`` in another process, paused (SIGSTOP) the moment its copy begins."""
    proc = subprocess.Popen([*VOXSWAP, "registry", "add", str(src), "--version", name,
                             "--registry", str(registry.root)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    processes.append(proc)
    staging = wait_until(lambda: staging_of(registry, name) or proc.poll() is not None, timeout_s=60,
                         interval_s=0.002, message=f"the add of {name} to start copying")
    proc.send_signal(signal.SIGSTOP)
    assert isinstance(staging, Path), f"the add of {name} ended before it could be caught: {proc.communicate()}"
    assert not (registry.versions_dir / name).exists(), "the add finished before it could be caught"
    return staging


def test_an_add_killed_mid_copy_is_cleaned_at_the_next_start_and_a_live_add_is_never_touched(
    registry: Registry, settings: Settings, model_dir: Callable[..., Path],
    processes: list[subprocess.Popen[str]],
) -> None:
    big = model_dir("a big model", weights_mb=BIG_MB)
    live = start_add(registry, big, "live", processes)
    two_hours_ago = time.time() - 7200  # what copytree would give it from an old source folder
    os.utime(live, (two_hours_ago, two_hours_ago))

    killed = start_add(registry, big, "killed", processes)  # its own add left the paused one alone
    assert live.is_dir()
    processes[1].kill()
    processes[1].wait(timeout=30)
    assert killed.is_dir()  # the finding: a model-sized copy that nobody will finish

    with TestClient(create_app(settings)) as client:
        assert client.get("/health/ready").status_code == 200
    assert not killed.exists() and not killed.with_name(killed.name + ".lock").exists()
    assert live.is_dir()

    processes[0].send_signal(signal.SIGCONT)
    out, err = processes[0].communicate(timeout=120)
    assert processes[0].returncode == 0, err
    assert "added live" in out
    assert registry.verify("live").name == "live"
    assert not list(registry.staging_dir.iterdir())


def test_an_upload_cut_short_by_a_killed_server_is_cleaned_at_its_next_start(
    registry: Registry, model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """Uploads were kept in ``voxswap-upload-*`` folders of the system's temp dir, where no start ever
    looked; now they are owned folders in the registry's ``.staging``."""
    archive = registry.export_archive("b", tmp_path / "b.tar.gz")
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {"VOXSWAP_ADMIN_TOKEN": AUTH["Authorization"].split()[1], "TMPDIR": str(temp)}
    big_archive = tmp_path / "big.tar.gz"
    elsewhere = Registry(tmp_path / "elsewhere")
    elsewhere.add(model_dir("a big model", weights_mb=BIG_MB), "big")
    elsewhere.export_archive("big", big_archive)
    answers: list[BaseException | int] = []

    def send(url: str) -> None:
        try:
            with big_archive.open("rb") as fh:
                answers.append(httpx.post(f"{url}/admin/model/versions", data={"version": "big"},
                                          files={"file": ("big.tar.gz", fh)}, headers=AUTH, timeout=120).status_code)
        except httpx.HTTPError as exc:
            answers.append(exc)

    with server_process(registry.root, tmp_path / "data", tmp_path / "server.log", **env) as server:
        sender = threading.Thread(target=send, args=(server.url,))
        sender.start()
        wait_until(lambda: list(registry.staging_dir.glob("upload.*")), interval_s=0.002, timeout_s=60,
                   message="the upload to be unpacked")
        server.kill()
        sender.join(timeout=60)
        assert isinstance(answers[0], httpx.HTTPError)  # the server died under the request
        left = sorted(p.name.split(".")[0] for p in registry.staging_dir.iterdir() if p.is_dir())
        assert "received" in left and "upload" in left  # the archive and its unpacked copy
        assert not [p for p in temp.iterdir() if p.is_dir()]  # no upload folder where no start looks

        server.start()
        assert not list(registry.staging_dir.iterdir())
        with archive.open("rb") as fh:  # and uploads work as before
            r = httpx.post(f"{server.url}/admin/model/versions", data={"version": "b2"},
                           files={"file": ("b.tar.gz", fh)}, headers=AUTH, timeout=120)
        assert r.status_code == 201, r.text
    assert not list(registry.staging_dir.iterdir())


def half_written(path: Path, text: str, processes: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HALF_WRITTEN, str(path), text], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    processes.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "writing\n"
    return proc


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_an_orphaned_state_json_tmp_is_removed_at_start_and_a_live_writers_is_not(
    registry: Registry, settings: Settings, processes: list[subprocess.Popen[str]]
) -> None:
    state = registry.state_path.read_text()
    killed = half_written(registry.state_path, "{torn", processes)
    (orphan,) = temporaries(registry.root)
    killed.kill()
    killed.wait(timeout=30)
    writing = half_written(registry.state_path, state, processes)  # the same state, rewritten slowly
    assert orphan.exists() and len(temporaries(registry.root)) == 2

    with TestClient(create_app(settings)) as client:
        assert client.get("/api/system/status").json()["model_version"] == "a"
    assert not orphan.exists()
    assert len(temporaries(registry.root)) == 1  # the live writer's

    writing.communicate("\n", timeout=30)
    assert writing.returncode == 0
    assert registry.state_path.read_text() == state and temporaries(registry.root) == []


def test_a_result_a_killed_job_worker_never_renamed_is_swept(
    tmp_path: Path, processes: list[subprocess.Popen[str]]
) -> None:
    store = JobStore(tmp_path / "data").ensure()
    staged = store.stage("a.wav", io.BytesIO(b"RIFF"), ".wav", limit=1024)
    (job,) = store.add([staged], language="auto", use_itn=False, webhook_url=None, max_pending=10)
    folder = store.job_dir(job.id)
    killed = half_written(folder / "result.json", '{"text": "half', processes)
    killed.kill()
    killed.wait(timeout=30)
    assert len(temporaries(folder)) == 1

    store.sweep(retention_s=3600)
    assert temporaries(folder) == [] and (folder / "input.wav").is_file()


def test_cleaning_at_any_moment_never_breaks_a_write_or_an_add_in_progress(tmp_path: Path) -> None:
    """The cleaner may take a lock file in the instant between its creation and its owner's flock;
    the owner notices and starts again. Here a cleaner runs flat out beside writers and adds."""
    registry = Registry(tmp_path / "r").ensure()
    stop = threading.Event()
    failures: list[BaseException] = []

    def clean() -> None:
        while not stop.is_set():
            registry.clean_leftovers()

    cleaners = [threading.Thread(target=clean) for _ in range(2)]
    for cleaner in cleaners:
        cleaner.start()
    try:
        for i in range(200):
            write_json_atomic(registry.state_path, {"n": i})
            with registry.work_folder("busy") as folder:
                (folder / "part").write_bytes(b"x" * 1000)
                assert (folder / "part").read_bytes() == b"x" * 1000
    except BaseException as exc:
        failures.append(exc)
    finally:
        stop.set()
        for cleaner in cleaners:
            cleaner.join(timeout=30)
    assert failures == []
    assert json.loads(registry.state_path.read_text()) == {"n": 199}
    assert temporaries(registry.root) == [] and list(registry.staging_dir.iterdir()) == []
