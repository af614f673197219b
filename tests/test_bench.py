"""The benchmark harness runs end to end in --quick mode and writes a complete report.

Only the harness is tested: every section, table and plot is there and the numbers are sane (finite,
positive, counted right). Timings are never asserted; what they mean is for docs/benchmarks.md.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import run

pytestmark = [pytest.mark.e2e, pytest.mark.long]  # the throughput part runs voxswap under gunicorn with 2 workers

SECTIONS = ("overhead", "throughput", "swaps", "memory", "startup", "shadow", "pipeline", "streams", "floor", "sherpa",
            "batching")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench") / "benchmarks.md"
    assert run.main(["--quick", "--out", str(out)]) == 0
    return out, out.read_text(), json.loads(out.with_suffix(".json").read_text())


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_the_report_has_every_section_a_goal_table_and_the_run_context(
    quick_report: tuple[Path, str, dict[str, Any]]
) -> None:
    _, text, raw = quick_report
    for title in ("## Summary", "## Machine and software", "## Commands", "## 1. Overhead", "## 2. Throughput",
                  "## 3. Swap under load", "## 4. Memory", "## 5. Start-up", "## 6. Shadow traffic",
                  "## 7. Pipelines", "## 8. Realtime streams", "## 9. voxswap's own cost", "## 10. sherpa-onnx",
                  "## 11. Dynamic batching"):
        assert title in text
    assert "| benchmark" in text and "met?" in text
    assert "stand-in" in text and "--model-dir" in text and "Quick run" in text
    assert "onnxruntime" in text and "funasr-onnx" in text and "voxswap commit" in text
    assert "bench.run --quick" in text
    assert set(raw["sections"]) == set(SECTIONS)
    assert len(raw["runs"]) == 1 and len(raw["runs"][0]["load_start"]) == 3
    goals = [g for s in raw["sections"].values() for g in s["goals"]]
    assert len(goals) >= 10 and all(g["met"] in (True, False, None) for g in goals)


def test_the_floor_batching_and_sherpa_parts_measure_something(quick_report: tuple[Path, str, dict[str, Any]]) -> None:
    _, _, raw = quick_report
    floor = raw["sections"]["floor"]["data"]["p50"]
    assert all(_positive(floor[k]) for k in ("direct", "echo", "voxswap"))
    cells = raw["sections"]["batching"]["data"]["cells"]
    assert set(cells) == {"1", "8"} and all(_positive(c["on"]) and _positive(c["off"]) for c in cells.values())
    assert raw["sections"]["batching"]["data"]["mean_batch"] >= 1.0
    said = [g for g in raw["sections"]["sherpa"]["goals"] if "decodes the stand-in" in g["name"]]
    assert said and all(g["met"] for g in said)  # the same graph, read by both runtimes


def test_overhead_and_throughput_numbers_are_sane(quick_report: tuple[Path, str, dict[str, Any]]) -> None:
    _, _, raw = quick_report
    clips = raw["sections"]["overhead"]["data"]["clips"]
    assert set(clips) == {"1", "10", "30"}
    for row in clips.values():
        assert row["n"] > 0
        assert all(_positive(row[k]) for k in ("direct_p50", "server_p50", "server_p99", "ratio_p50"))
    workers = raw["sections"]["throughput"]["data"]["workers"]
    assert set(workers) == {"1", "2"}
    for cell in workers.values():
        assert all(_positive(cell[k]) for k in ("direct", "c1", "c2", "c4", "c8", "d1", "d8", "best_ratio"))
        assert cell["failed"] == 0
    assert len(workers["2"]["shares"]["8"]) == 2  # both gunicorn workers reported their requests


def test_swaps_under_load_lose_nothing_and_refusals_are_refused(
    quick_report: tuple[Path, str, dict[str, Any]]
) -> None:
    _, _, raw = quick_report
    swaps = raw["sections"]["swaps"]["data"]
    assert swaps["failed"] == 0 and swaps["mislabelled"] == 0 and swaps["requests"] > 0
    assert swaps["swaps_ok"] == swaps["swaps"] == 4
    assert swaps["refused_ok"] == swaps["refused"] == 2
    assert swaps["refused_outcomes"] == ["load_failed", "smoke_failed"]
    assert all(_positive(swaps["phases"][p]) for p in ("verify_s", "load_s", "smoke_s", "time_to_flip_s"))
    assert _positive(swaps["p99_outside"]) and _positive(swaps["p99_during"])


def test_memory_and_startup_numbers_are_sane(quick_report: tuple[Path, str, dict[str, Any]]) -> None:
    _, _, raw = quick_report
    standard = raw["sections"]["memory"]["data"]["standard"]
    assert len(standard["points"]) == 5 and standard["failed"] == 0
    assert _positive(standard["base"])
    for point in standard["points"]:
        assert point["peak"] >= point["rss_before"] > 0 and point["rss_after_free"] > 0
    for bare in (standard["bare_load"], standard["bare_load_external"]):
        assert bare["peak"] >= bare["before"] > 0
    for row in raw["sections"]["startup"]["data"].values():
        assert _positive(row["ready_s"]) and _positive(row["bare_build_s"])


def test_the_plots_are_png_files_linked_from_the_report(quick_report: tuple[Path, str, dict[str, Any]]) -> None:
    out, text, _ = quick_report
    for name in ("benchmarks-swaps.png", "benchmarks-memory.png"):
        assert f"]({name})" in text
        data = (out.parent / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_the_shadow_numbers_are_sane(quick_report: tuple[Path, str, dict[str, Any]]) -> None:
    data = quick_report[2]["sections"]["shadow"]["data"]
    assert data["failed"] == 0  # a shadow never fails a live request
    levels = data["levels"]
    assert levels and all(row["n_off"] > 0 and row["n_on"] > 0 for row in levels.values())
    assert all(_positive(row["p99_ratio"]) and _positive(row["rps_ratio"]) for row in levels.values())


def test_the_pipeline_numbers_are_sane(quick_report: tuple[Path, str, dict[str, Any]]) -> None:
    data = quick_report[2]["sections"]["pipeline"]["data"]
    if not data["vad_available"]:
        pytest.skip("the real FSMN-VAD export is unavailable here")
    assert data["failed"] == 0 and data["mislabelled"] == 0 and data["requests"] > 0
    assert data["clips"]
    for row in data["clips"].values():
        assert row["n"] > 0 and row["n_served_vad"] == row["n"]  # the server's VAD stage ran on every request
        assert all(_positive(row[k]) for k in ("vad_direct_p50", "vad_direct_rtf", "vad_served_p50", "vad_served_rtf"))
        assert row["vad_segments"] >= 1  # the detector found the speech between the pauses
        assert set(row["paths"]) == {"sensevoice", "asr-punc", "full"}
        for cell in row["paths"].values():
            assert cell["n"] == row["n"] and all(_positive(cell[k]) for k in ("p50", "ratio_p50", "inference_p50"))


@pytest.fixture(scope="module")
def streams_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-streams") / "benchmarks.md"
    assert run.main(["--quick", "--only", "streams", "--out", str(out)]) == 0
    assert "## 8. Realtime streams" in out.read_text()
    data: dict[str, Any] = json.loads(out.with_suffix(".json").read_text())["sections"]["streams"]["data"]
    return data


def test_realtime_streams_end_every_turn_and_time_it(streams_report: dict[str, Any]) -> None:
    levels = streams_report["levels"]
    assert set(levels) == {"1", "2"}  # the quick ramp, run to its end
    for streams, cell in levels.items():
        assert cell["failed"] == {} and cell["lost"] == 0 and cell["errors"] == []
        assert cell["completed"] >= int(streams)  # every stream spoke at least one whole turn
        assert all(_positive(cell[k]) for k in ("final_p95", "after_stop_p95", "first_delta_p50", "server_cores"))
    assert streams_report["best"] in (0, 1, 2)
