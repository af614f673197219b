"""The demo version a fresh registry is seeded with, so ``voxswap serve`` works out of the box.

It is a generated stand-in, not speech recognition: it answers every speech-like clip with the
same sentence. The log says so, loudly, and says how to bring a real SenseVoice-small.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

from server.storage.registry import Registry
from server.testing.modelgen import TestModelSpec, make_test_model
from server.vocab import HistoryEvent

log = logging.getLogger("voxswap.demo")
DEMO_VERSION = "demo"
DEMO_TEXT = "this is the voxswap demo model not real speech recognition"
WARNING = (
    "\n" + "!" * 78 + "\n"
    "!! The registry was empty, so voxswap added and promoted a GENERATED DEMO MODEL.\n"
    "!! It is NOT real speech recognition: every clip transcribes to the same sentence.\n"
    "!! Bring a real SenseVoice-small ONNX export (model_quant.onnx or model.onnx, config.yaml,\n"
    "!! am.mvn, chn_jpn_yue_eng_ko_spectok.bpe.model) and run:\n"
    "!!   voxswap registry add /path/to/SenseVoiceSmall --version sensevoice-small-v1\n"
    "!!   voxswap registry promote sensevoice-small-v1\n"
    "!! A running server picks the promotion up by itself. See README.md.\n" + "!" * 78
)


def seed_if_empty(registry: Registry) -> bool:
    """Add and promote the demo version if the registry has no version; True if it did."""
    registry.ensure()
    with FileLock(str(registry.root / ".seed.lock"), timeout=120):
        if not registry.is_empty():
            return False
        with tempfile.TemporaryDirectory(prefix="voxswap-demo-") as tmp:
            folder = make_test_model(Path(tmp) / DEMO_VERSION, TestModelSpec(text=DEMO_TEXT))
            registry.add(folder, DEMO_VERSION, source="generated demo (voxswap make-test-model)",
                         metadata={"demo": True, "note": "not real speech recognition"}, actor="seed")
            shutil.rmtree(folder, ignore_errors=True)
        if registry.state().current is None:
            registry.promote(DEMO_VERSION, actor="seed", event=HistoryEvent.SEED_DEMO)
    log.warning(WARNING, extra={"event": "demo_seeded", "version": DEMO_VERSION})
    return True
