"""The image, built once per session with scripts/build-image.sh, and the engine that runs it.

Tests marked ``container`` build and run the image; they run only when selected (``pytest -m
container``, as .ci/run does after the default suite), so ``./scripts/test.sh`` builds nothing.
The engine and its flags come from ``scripts/build-image.sh --print-engine``: the same docker or
podman, with the same sandbox flags, that built the image.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.container.engine import BUILD_SCRIPT, ROOT, Engine


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    probe = subprocess.run([str(BUILD_SCRIPT), "--print-engine"], capture_output=True, text=True, cwd=ROOT)
    if probe.returncode != 0:
        pytest.skip(f"no container engine: {probe.stderr.strip()} (scripts/install-container-deps.sh installs "
                    "podman on Debian)")
    command, run_flags = ([*probe.stdout.splitlines(), ""])[:2]
    found = Engine(shlex.split(command), shlex.split(run_flags))
    yield found
    found.cleanup()


@pytest.fixture(scope="session")
def image(engine: Engine) -> str:
    """The image of this checkout, built once per session (layers cached), or VOXSWAP_TEST_IMAGE."""
    prebuilt = os.environ.get("VOXSWAP_TEST_IMAGE")
    if prebuilt:
        return prebuilt
    tag = "voxswap:test"
    started = time.monotonic()
    build = subprocess.run(["nice", "-n", "19", str(BUILD_SCRIPT), tag], capture_output=True, text=True, cwd=ROOT,
                           timeout=3600)
    assert build.returncode == 0, f"build-image.sh failed:\n{build.stdout[-4000:]}\n{build.stderr[-4000:]}"
    print(f"\n{build.stdout.strip().splitlines()[-1]} (fixture: {time.monotonic() - started:.0f} s)")
    return tag


@pytest.fixture(scope="session")
def shared_models(tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[..., Path]) -> Path:
    """Generated model folders the containers' own user can read, mounted read-only at /models."""
    root = tmp_path_factory.mktemp("container-models")
    root.chmod(0o755)
    for version, text in (("a", "container model a"), ("b", "container model b"), ("c", "container model c")):
        source = model_dir(text, compute_ms=10)
        subprocess.run(["cp", "-r", str(source), str(root / version)], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(root)], check=True)
    return root
