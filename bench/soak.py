"""`make soak`: the service's memory under a steady, moderate load.

Measures the full-path throughput first (new session, unique message, in-process simulator,
wrk -c<C> for 10 s after a warm-up), then drives the same full path at half that rate for
the warm-up plus the soak duration with wrk (a fixed number of connections paced by a Lua
``delay()`` per request: wrk2 is not packaged), and samples the server's RSS
(/proc/<pid>/status VmRSS) every 10 s. Growth = last sample / first sample after the
warm-up - 1; target <= 5 %.

Usage: ``.venv/bin/python bench/soak.py [--minutes 5] [--warmup 30] [--rate R]``;
``--rate`` skips the throughput measurement. Same private database / Redis prefix /
cleanup as bench/run.py. Exit status 0 when it measured, 1 on errors, 2 when it could not
run, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import harness as h

SAMPLE_EVERY_S = 10.0
GROWTH_LIMIT = 0.05
SOAK_CONNECTIONS = 32


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="agentserve soak test (RSS growth)")
    parser.add_argument("--minutes", type=float, default=float(os.environ.get("SOAK_MINUTES", "5")))
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before sampling")
    parser.add_argument("--rate", type=float, help="requests/s (default: half the full path)")
    parser.add_argument("--concurrency", type=int, default=64, help="for the full-path probe")
    parser.add_argument("--keep-logs", type=Path)
    args = parser.parse_args(argv)
    h.install_signal_handlers()
    machine = h.machine_info()
    with h.exit_codes("soak"):
        wrk = h.Wrk(h.ensure_wrk())
        h.raise_nofile()
        with h.RunResources(args.keep_logs) as res:
            settings = h.service_settings(res, pool_size=h.POOL_SIZE)
            server = h.service_server(res, settings).start()
            try:
                return soak(args, wrk, server, settings, machine)
            finally:
                server.stop()


def soak(
    args: argparse.Namespace,
    wrk: h.Wrk,
    server: h.Server,
    settings: dict[str, str],
    machine: dict[str, object],
) -> int:
    rate = args.rate
    full = None
    if rate is None:
        wrk.run(
            "full path warm-up", server.url, "full_path", connections=args.concurrency, duration=3
        )
        full = wrk.run(
            "full path", server.url, "full_path", connections=args.concurrency, duration=10
        )
        rate = full.rps / 2
        h.log(f"full path: {full.rps:.1f} req/s -> soak at {rate:.1f} req/s")
    total_s = math.ceil(args.warmup + args.minutes * 60)
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        started = time.monotonic()
        next_at = args.warmup
        while not stop.wait(max(0.0, started + next_at - time.monotonic())):
            samples.append((time.monotonic() - started, server.rss_mib()))
            next_at += SAMPLE_EVERY_S

    rss_start = server.rss_mib()
    sampler = threading.Thread(target=sample, daemon=True)
    offset = server.log_size()
    h.log(
        f"soak: {rate:.1f} req/s with {SOAK_CONNECTIONS} connections for {total_s}s "
        f"({args.warmup:g}s warm-up, then RSS every {SAMPLE_EVERY_S:g}s)"
    )
    sampler.start()
    try:
        result = wrk.run(
            "soak",
            server.url,
            "soak",
            connections=SOAK_CONNECTIONS,
            duration=total_s,
            env={"BENCH_RATE": f"{rate:.3f}"},
        )
    except subprocess.TimeoutExpired as exc:
        raise h.BenchError(f"wrk did not finish: {exc}") from None
    finally:
        stop.set()
        sampler.join()
    problems = server.problems_since(offset)

    print()
    print(
        f"agentserve soak: machine {machine['nproc']} CPUs, {machine['cpu']}, "
        f"load {machine['loadavg']}"
    )
    if full is not None:
        print(
            f"full path (wrk -c{args.concurrency} -d10s): {full.rps:.1f} req/s, "
            f"p50 {full.p50_ms:.1f} ms"
        )
    print(
        f"soak: target {rate:.1f} req/s, achieved {result.rps:.1f} req/s over {total_s}s, "
        f"p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms, errors {result.errors}"
        + (f" ({result.error_detail()})" if result.errors else "")
    )
    print(
        f"RSS at start {rss_start:.1f} MiB; after the {args.warmup:g}s warm-up, "
        f"every {SAMPLE_EVERY_S:g}s:"
    )
    print("  " + " ".join(f"{rss:.1f}" for _, rss in samples))
    if problems:
        print(f"{len(problems)} server log lines >= WARNING, first: {problems[0][:200]}")
    if len(samples) < 2:
        print("FAIL  soak: fewer than two RSS samples")
        return 1
    first, last = samples[0][1], samples[-1][1]
    growth = last / first - 1
    peak = max(rss for _, rss in samples)
    print(
        f"{'PASS' if growth <= GROWTH_LIMIT else 'FAIL'}  soak: RSS grew {growth:+.1%} "
        f"({first:.1f} -> {last:.1f} MiB, peak {peak:.1f}) "
        f"over {samples[-1][0] - samples[0][0]:.0f}s "
        f"(target <= {GROWTH_LIMIT:.0%})"
    )
    print(f"{'PASS' if result.errors == 0 else 'FAIL'}  soak: {result.errors} errors")
    print("settings: " + " ".join(f"{k}={v}" for k, v in settings.items() if "URL" not in k))
    return 1 if result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
