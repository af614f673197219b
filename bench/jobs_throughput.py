"""``python -m bench.jobs_throughput [--jobs 60] [--clip-s 2] [--compute-ms 10] [--rounds 3]``: jobs/s.

Issue 17: one queue for a fleet. Jobs are submitted to the first instance and timed until every one
has completed, with 1 and 2 instances, on SQLite (two processes sharing one data dir, the most
SQLite can share) and on PostgreSQL (two instances with their own data dirs, sharing only the
database, started from Debian's package as the tests do but with fsync on, as in production).
Reported as ratios measured in the same run: 2 instances over 1 on each store, and PostgreSQL over
SQLite at each size. On a machine with few cores two instances compete for the same CPUs, so the
2/1 ratio says more about the queue's overhead than about a real fleet's scaling, which adds a
machine's cores per instance.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from server.storage.registry import Registry
from server.testing import synth
from server.testing.modelgen import TestModelSpec, make_test_model
from testkit import postgres as pgkit
from testkit.processes import ServerProcess, start_server

TEXT = "benchmark jobs"


def run_once(registry: Path, root: Path, *, instances: int, jobs: int, clip: bytes,
             env: dict[str, str], shared_data: bool) -> float:
    """Jobs per second, submit-to-last-completed, for ``instances`` servers sharing one queue."""
    common = {"VOXSWAP_JOB_POLL_S": "0.05", "VOXSWAP_MAX_PENDING_JOBS": str(jobs * 2), **env}
    if shared_data:
        common["VOXSWAP_DATA_DIR"] = str(root / "shared-data")
    servers: list[ServerProcess] = []
    try:
        for n in range(instances):
            servers.append(start_server(registry, root / f"i{n}", env=common))
        with httpx.Client(base_url=servers[0].url, timeout=60) as c:
            started = time.perf_counter()
            for start in range(0, jobs, 10):
                files = [("files", (f"{k}.wav", clip)) for k in range(start, min(start + 10, jobs))]
                r = c.post("/api/jobs", files=files)
                r.raise_for_status()
            while c.get("/api/jobs", params={"status": "completed", "limit": 1}).json()["total"] < jobs:
                time.sleep(0.02)
            elapsed = time.perf_counter() - started
            failed = c.get("/api/jobs", params={"status": "failed", "limit": 1}).json()["total"]
            assert failed == 0, f"{failed} jobs failed"
        return jobs / elapsed
    finally:
        for server in servers:
            server.stop(signal.SIGTERM)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--clip-s", type=float, default=2.0)
    parser.add_argument("--compute-ms", type=float, default=10.0, help="model CPU ms per audio second")
    parser.add_argument("--rounds", type=int, default=3, help="each cell is the median of this many runs")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    if not pgkit.available():
        print("PostgreSQL is not installed (scripts/install-system-deps.sh)")
        return 2
    with tempfile.TemporaryDirectory(prefix="voxswap-bench-jobs-") as tmp, pgkit.postgres(durable=True) as pg:
        root = Path(tmp)
        model = make_test_model(root / "model", TestModelSpec(TEXT, compute_ms=args.compute_ms))
        registry = Registry(root / "registry").ensure()
        registry.add(model, "a", source="bench")
        registry.promote("a", actor="bench")
        clip = synth.wav_bytes(synth.speech_like(args.clip_s))
        samples: dict[str, list[float]] = {}
        for round_ in range(args.rounds):  # the cells alternate, so a noisy minute spreads over all four
            for store in ("sqlite", "postgresql"):
                for instances in (1, 2):
                    cell, where = f"{store}-{instances}", f"r{round_}-{store}-{instances}"
                    env = {"VOXSWAP_JOBS_URL": pg.create_database(where.replace("-", "_"))} \
                        if store == "postgresql" else {}
                    rate = run_once(registry.root, root / where, instances=instances, jobs=args.jobs, clip=clip,
                                    env=env, shared_data=store == "sqlite")
                    samples.setdefault(cell, []).append(rate)
                    print(f"round {round_ + 1}: {store:10} {instances} instance(s): {rate:.2f} jobs/s", flush=True)
        rates = {cell: statistics.median(values) for cell, values in samples.items()}
        for cell, rate in rates.items():
            print(f"median {cell:14} {rate:.2f} jobs/s")
    ratios = {
        "sqlite 2/1": rates["sqlite-2"] / rates["sqlite-1"],
        "postgresql 2/1": rates["postgresql-2"] / rates["postgresql-1"],
        "postgresql/sqlite, 1 instance": rates["postgresql-1"] / rates["sqlite-1"],
        "postgresql/sqlite, 2 instances": rates["postgresql-2"] / rates["sqlite-2"],
    }
    for name, value in ratios.items():
        print(f"{name:32} {value:.2f}")
    if args.json:
        report = {"jobs_per_s": rates, "samples": samples, "ratios": ratios, "args": vars(args)}
        args.json.write_text(json.dumps(report, default=str, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
