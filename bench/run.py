"""`make bench`: the service against a bare baseline and an I/O floor, in one run.

Three apps get the same bounded load from wrk (``-t2 -c<C> -d<D>s --latency`` with a Lua
script per scenario, bench/wrk/), each as uvicorn with one worker (uvloop, httptools, no
access log), with Postgres and Redis on 127.0.0.1:

* baseline - bench/apps/baseline.py: POST returns a fixed JSON body;
* floor    - bench/apps/floor.py: JSON parse, Redis GET, one Postgres transaction (a session
             row and its two messages), Redis SET, JSON answer; with unique messages and
             with one repeated message;
* service  - app.main:create_app: 1. full path, 2. continuation (20 and 1,000 messages),
             3. cache hit, 4. a 50 ms upstream, 5. 1,000 connections on a 2 s upstream.

Then the streaming scenarios of bench/streams.py (its own SSE load client): the simulator
alone and the service in front of it at c=8, and 1,000 streams on a 2 s upstream.

It prints a table (requests/s, p50, p99, errors, CPU per request, and requests/s as a
fraction of the baseline and of the floor), a table of the streams (time to the first delta,
gaps between deltas), and one PASS/FAIL line per target. It creates a
database and a Redis key prefix of its own and removes them at the end. Exit status: 0 when
it measured (targets may be missed), 1 when a scenario had errors, 2 when it could not run,
130 when interrupted.

Options: ``--quick`` (a smoke run of about a minute), ``--duration`` / BENCH_DURATION
(seconds per measured run, default 10), ``--warmup`` / BENCH_WARMUP (default 3),
``--concurrency`` / BENCH_CONCURRENCY (connections for the throughput scenarios, default 64),
``--json PATH`` (write every figure as JSON).
The soak test is separate: bench/soak.py (make soak).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import harness as h
import streams

SESSIONS_RATE = 1500  # req/s the 20-message sessions are prepared for (two turns each)
UPSTREAM_LATENCY_MS = 50.0
UPSTREAM_CONCURRENCY = 32
HIGH_LATENCY_MS = 2000.0
HIGH_CONCURRENCY = 1000
POOL_SIZE, DB_POOL_SIZE, DB_MAX_OVERFLOW = h.POOL_SIZE, h.DB_POOL_SIZE, h.DB_MAX_OVERFLOW
RSS_LIMIT_MIB = 300.0
# scenario 4: c / latency requests/s; >= 90 % of it, at most +5 ms p50 and +30 ms p99 over 50 ms
UPSTREAM_IDEAL_RPS = UPSTREAM_CONCURRENCY / (UPSTREAM_LATENCY_MS / 1000)
UPSTREAM_MIN_FRACTION, UPSTREAM_MAX_ADDED_P50_MS, UPSTREAM_MAX_ADDED_P99_MS = 0.90, 5.0, 30.0


@dataclass
class Config:
    quick: bool
    duration: int
    warmup: int
    concurrency: int
    high_duration: int
    sessions: int
    sessions20: int
    json_path: Path | None
    keep_logs: Path | None

    @classmethod
    def from_args(cls, argv: list[str] | None = None) -> Config:
        parser = argparse.ArgumentParser(
            description="agentserve performance bench (see bench/run.py's docstring)"
        )
        parser.add_argument("--quick", action="store_true", help="smoke run: 2 s per scenario")
        parser.add_argument("--duration", type=int, help="seconds per measured run (10)")
        parser.add_argument("--warmup", type=int, help="seconds of warm-up per scenario (3)")
        parser.add_argument("--concurrency", type=int, help="wrk -c for scenarios 1-3 (64)")
        parser.add_argument("--json", type=Path, help="also write the results here")
        parser.add_argument("--keep-logs", type=Path, help="copy the server logs here at the end")
        args = parser.parse_args(argv)
        quick = bool(args.quick)
        duration = args.duration or int(os.environ.get("BENCH_DURATION", "2" if quick else "10"))
        warmup = args.warmup
        if warmup is None:
            warmup = int(os.environ.get("BENCH_WARMUP", "1" if quick else "3"))
        concurrency = args.concurrency or int(os.environ.get("BENCH_CONCURRENCY", "64"))
        # scenario 5 needs a few 2 s cycles after the ramp-up for a steady-state rate
        high_duration = max(10 if quick else 20, 2 * duration)
        return cls(
            quick=quick,
            duration=max(1, duration),
            warmup=max(0, warmup),
            concurrency=max(2, concurrency),
            high_duration=high_duration,
            # Round robin over 8x (4x quick) as many sessions as connections, so a session
            # comes back only after ~8 round trips of every other connection. There are also
            # enough 20-message sessions for at most two turns each at SESSIONS_RATE, so they
            # still hold 20 (or 22) messages when continued, well under the history window.
            sessions=(4 if quick else 8) * max(2, concurrency),
            sessions20=max(
                (4 if quick else 8) * max(2, concurrency),
                SESSIONS_RATE * (max(0, warmup) + max(1, duration)) // 2,
            ),
            json_path=args.json,
            keep_logs=args.keep_logs,
        )


@dataclass
class Row:
    key: str
    label: str
    result: h.WrkResult
    floor: str | None  # which floor row this one is compared with
    notes: list[str] = field(default_factory=list)


class Bench:
    def __init__(self, config: Config, res: h.RunResources, wrk: h.Wrk) -> None:
        self.config = config
        self.res = res
        self.wrk = wrk
        self.rows: dict[str, Row] = {}
        self.streams: dict[str, streams.StreamResult] = {}
        self.extra: dict[str, Any] = {}
        self.settings: dict[str, dict[str, str]] = {}

    # -- one measured scenario ------------------------------------------------------------

    def measure(
        self,
        key: str,
        label: str,
        server: h.Server,
        script: str,
        *,
        connections: int,
        duration: int | None = None,
        warmup: int | None = None,
        floor: str | None = None,
        env: dict[str, str] | None = None,
        timeout_s: int = 10,
        sample_rss: bool = False,
    ) -> Row:
        duration = duration or self.config.duration
        warmup = self.config.warmup if warmup is None else warmup
        notes: list[str] = []
        if warmup > 0:
            warm = self.wrk.run(
                f"{label} (warm-up)",
                server.url,
                script,
                connections=connections,
                duration=warmup,
                env=env,
                timeout_s=timeout_s,
            )
            if warm.errors:
                notes.append(f"warm-up errors: {warm.error_detail()}")
        if not server.alive():
            raise h.BenchError(f"{server.name} died during the warm-up:\n{server.tail()}")
        server.settle()
        offset = server.log_size()
        rss_before = server.rss_mib()
        cpu_before = server.cpu_seconds()
        h.log(f"measuring {label}: wrk -c{connections} -d{duration}s ({script}.lua)")

        def run() -> h.WrkResult:
            return self.wrk.run(
                label,
                server.url,
                script,
                connections=connections,
                duration=duration,
                env=env,
                timeout_s=timeout_s,
            )

        if sample_rss:
            with h.RSSSampler(server) as sampler:
                result = run()
            result.extra["rss_peak_mib"] = sampler.peak
            result.extra["rss_end_mib"] = sampler.last
        else:
            result = run()
        cpu = server.cpu_seconds() - cpu_before
        result.extra["server_cpu_s"] = cpu
        result.extra["cpu_ms_per_request"] = (
            cpu * 1000 / result.requests if result.requests else float("nan")
        )
        result.extra["rss_before_mib"] = rss_before
        result.extra["rss_after_mib"] = server.rss_mib()
        problems = server.problems_since(offset)
        if problems:
            summary = h.summarise_problems(problems)
            h.log(f"  {summary}")
            notes.append(summary)
            result.extra["server_problems"] = problems[:20]
        if not server.alive():
            raise h.BenchError(f"{server.name} died during {label}:\n{server.tail()}")
        row = Row(key, label, result, floor, notes)
        self.rows[key] = row
        h.log(
            f"  {result.rps:8.1f} req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms"
            f"  errors {result.errors}" + (f"  ({result.error_detail()})" if result.errors else "")
        )
        return row

    # -- the apps ---------------------------------------------------------------------------

    def run_baseline(self) -> None:
        server = h.baseline_server(self.res).start()
        try:
            self.measure(
                "baseline",
                "baseline (fixed JSON)",
                server,
                "baseline",
                connections=self.config.concurrency,
            )
        finally:
            server.stop()

    def run_floor(self) -> None:
        server = h.floor_server(
            self.res, db_pool_size=DB_POOL_SIZE, db_max_overflow=DB_MAX_OVERFLOW
        ).start()
        self.settings["floor"] = {
            "asyncpg pool": f"min {DB_POOL_SIZE}, max {DB_POOL_SIZE + DB_MAX_OVERFLOW}",
            "redis pool": "50 connections (BlockingConnectionPool)",
        }
        try:
            c = self.config.concurrency
            self.measure(
                "floor_unique", "floor, unique messages", server, "floor_unique", connections=c
            )
            message = f"bench floor {secrets.token_hex(4)}: what is the capital of France?"
            status, _, body = h.http("POST", server.url + "/query", {"message": message})
            if status != 200:
                raise h.BenchError(f"floor warm request failed: {status} {body[:200]!r}")
            self.measure(
                "floor_repeated",
                "floor, repeated message",
                server,
                "floor_repeated",
                connections=c,
                env={"BENCH_MESSAGE": message},
            )
        finally:
            server.stop()

    def run_service_inprocess(
        self, sessions20: Path, sessions1000: Path, sessions50: Path | None
    ) -> None:
        c = self.config.concurrency
        settings = h.service_settings(self.res, pool_size=POOL_SIZE, db_pool_size=DB_POOL_SIZE)
        self.settings["service (scenarios 1-3)"] = settings
        server = h.service_server(self.res, settings).start()
        try:
            row = self.measure(
                "full_path",
                "1. full path (new session, miss)",
                server,
                "full_path",
                connections=c,
                floor="floor_unique",
            )
            self._cache_note(row, "MISS")
            runs = [
                (sessions20, "continuation_20", "2. continuation (20 msgs)"),
                (sessions1000, "continuation_1000", "2b. continuation (1,000 msgs)"),
            ]
            if sessions50 is not None:  # reference: a session as long as the history window
                runs.append((sessions50, "continuation_50", "   continuation (50 msgs)"))
            for sessions, key, label in runs:
                h.check_prepared_sessions(self.res, server, sessions)
                row = self.measure(
                    key,
                    label,
                    server,
                    "continuation",
                    connections=c,
                    floor="floor_unique",
                    env={"BENCH_SESSIONS": str(sessions)},
                )
                self._cache_note(row, "MISS")
            message, warm_notes = self._warm_cache(server)
            row = self.measure(
                "cache_hit",
                "3. cache hit (fresh session)",
                server,
                "cache_hit",
                connections=c,
                floor="floor_repeated",
                env={"BENCH_MESSAGE": message},
            )
            row.notes.extend(warm_notes)
            self._cache_note(row, "HIT")
        finally:
            server.stop()

    def run_service_upstream(self) -> None:
        sim = h.simulator_server(self.res, UPSTREAM_LATENCY_MS).start()
        try:
            if not self.config.quick:  # for reference only: saves two runs in smoke mode
                self.measure(
                    "upstream_direct",
                    "   the 50 ms upstream alone",
                    sim,
                    "simulator_direct",
                    connections=UPSTREAM_CONCURRENCY,
                )
                self.run_floor_upstream(f"{sim.url}/v1")
            settings = h.service_settings(
                self.res,
                pool_size=POOL_SIZE,
                db_pool_size=DB_POOL_SIZE,
                llm_base_url=f"{sim.url}/v1",
                llm_max_connections=POOL_SIZE,
            )
            self.settings["service (scenarios 4-5)"] = settings
            self.settings["simulator"] = {
                "command": f"agentserve simulate --latency-ms {UPSTREAM_LATENCY_MS:g}",
                "scenario 5": f"PUT /sim/knobs latency_ms={HIGH_LATENCY_MS:g}",
            }
            server = h.service_server(self.res, settings, name="service-upstream").start()
            try:
                row = self.measure(
                    "upstream_latency",
                    "4. upstream latency 50 ms",
                    server,
                    "upstream_latency",
                    connections=UPSTREAM_CONCURRENCY,
                    floor="floor_unique",
                )
                self._cache_note(row, "MISS")
                h.set_simulator_latency(sim, HIGH_LATENCY_MS)
                spread = int(HIGH_LATENCY_MS)
                row = self.measure(
                    "high_concurrency",
                    "5. high concurrency, upstream 2 s",
                    server,
                    "high_concurrency",
                    connections=HIGH_CONCURRENCY,
                    duration=self.config.high_duration,
                    warmup=0,
                    floor="floor_unique",
                    env={"BENCH_SPREAD_MS": str(spread)},
                    timeout_s=30,
                    sample_rss=True,
                )
                self._cache_note(row, "MISS")
                h.set_simulator_latency(sim, UPSTREAM_LATENCY_MS)
            finally:
                server.stop()
        finally:
            sim.stop()

    def run_floor_upstream(self, upstream_url: str) -> None:
        """Scenario 4's floor: the floor's I/O plus the same upstream call, for reference."""
        server = h.floor_server(
            self.res,
            db_pool_size=DB_POOL_SIZE,
            db_max_overflow=DB_MAX_OVERFLOW,
            upstream_url=upstream_url,
        ).start()
        try:
            self.measure(
                "floor_upstream",
                "   floor + the 50 ms upstream",
                server,
                "upstream_latency",
                connections=UPSTREAM_CONCURRENCY,
            )
        finally:
            server.stop()

    def _warm_cache(self, server: h.Server, patience: float = 40.0) -> tuple[str, list[str]]:
        """A message whose answer is cached: ask until it comes back as a hit. Returns the
        message and notes on what went wrong on the way.

        After an overloaded scenario the Redis breaker may be open (Redis is skipped for
        REDIS_BREAKER_OPEN_SECONDS after repeated failures), and a request may hang on a
        cross-replica lock whose holder failed to release it; then the bench moves on to a
        fresh message (and says so)."""
        deadline = time.monotonic() + patience
        notes: list[str] = []
        message = f"bench cache {secrets.token_hex(4)}: what is the capital of France?"
        waited = False
        misses = 0  # the first answer to a new message is a miss by definition
        while True:
            try:
                status, headers, body = h.http(
                    "POST", server.url + "/query", {"message": message}, timeout=5.0
                )
            except TimeoutError:
                note = "a warm-up request for a repeated message hung > 5 s (stale cache lock?)"
                h.log(f"  {note}; trying a fresh message")
                notes.append(note)
                message = f"bench cache {secrets.token_hex(4)}: what is the capital of France?"
                misses = 0
                continue
            if status != 200:
                raise h.BenchError(f"cache warm request failed: {status} {body[:300]!r}")
            if headers.get("x-cache") == "HIT":
                if waited:
                    h.log("  the cache answers hits again")
                return message, notes
            if time.monotonic() > deadline:
                raise h.BenchError(
                    f"no cache hit after {patience:g}s of asking the same question; "
                    f"service log:\n{server.tail(10)}"
                )
            misses += 1
            if misses == 1:
                continue  # stored now: ask again at once
            if not waited:
                h.log("  waiting for the cache to answer hits (Redis breaker open?)")
                notes.append("cache warm-up waited for the Redis breaker to close")
                waited = True
            time.sleep(0.5)

    @staticmethod
    def _cache_note(row: Row, expected: str) -> None:
        counts = row.result.x_cache
        total = sum(counts.values())
        if total and counts.get(expected, 0) != total:
            row.notes.append("X-Cache: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def _pct(value: float) -> str:
    return "-" if math.isnan(value) else f"{value * 100:.0f}%"


def _cpu(result: h.WrkResult) -> str:
    value = result.extra.get("cpu_ms_per_request", float("nan"))
    return "-" if math.isnan(value) else f"{value:.2f}ms"


def _ratio(a: Row | None, b: Row | None) -> float:
    if a is None or b is None or b.result.rps <= 0:
        return float("nan")
    return a.result.rps / b.result.rps


def upstream_figures(result: h.WrkResult) -> dict[str, float]:
    """Scenario 4's figures of one run: the steady rate (completions per second after the
    first second) against the ideal, the latency added over the upstream's, and the most
    one core can serve at the run's CPU per request."""
    steady = result.steady_rps(skip_s=1.0)
    # One worker is one core: at this CPU per request it cannot answer more than
    # 1/cpu requests a second, however the requests are scheduled.
    cpu_ms = float(result.extra.get("cpu_ms_per_request", math.nan))
    ceiling = 1000 / cpu_ms if cpu_ms > 0 else math.nan
    return {
        "ideal_rps": UPSTREAM_IDEAL_RPS,
        "steady_rps": steady,
        "fraction_of_ideal": steady / UPSTREAM_IDEAL_RPS,
        "added_p50_ms": result.p50_ms - UPSTREAM_LATENCY_MS,
        "added_p99_ms": result.p99_ms - UPSTREAM_LATENCY_MS,
        "cpu_ceiling_rps": ceiling,
        "cpu_ceiling_fraction": ceiling / UPSTREAM_IDEAL_RPS,
    }


def upstream_met(figures: dict[str, float]) -> tuple[bool, bool, bool]:
    """Scenario 4's three targets: the fraction of the ideal, the added p50, the added p99."""
    return (
        figures["fraction_of_ideal"] >= UPSTREAM_MIN_FRACTION,
        figures["added_p50_ms"] <= UPSTREAM_MAX_ADDED_P50_MS,
        figures["added_p99_ms"] <= UPSTREAM_MAX_ADDED_P99_MS,
    )


def derived(bench: Bench) -> dict[str, Any]:
    """Figures the targets use that are not in the table directly."""
    out: dict[str, Any] = {}
    rows = bench.rows
    for key, name in (("upstream_latency", "upstream"), ("floor_upstream", "floor_upstream")):
        up = rows.get(key)
        if not up:
            continue
        fig = out[name] = upstream_figures(up.result)
        cpu_ms = float(up.result.extra.get("cpu_ms_per_request", math.nan))
        up.notes.insert(
            0,
            f"steady {fig['steady_rps']:.0f}/s = {fig['fraction_of_ideal']:.0%} of ideal "
            f"{fig['ideal_rps']:.0f}/s; +{fig['added_p50_ms']:.1f} ms p50, "
            f"+{fig['added_p99_ms']:.1f} ms p99 over 50 ms; "
            f"one core at {cpu_ms:.2f} ms of CPU per request serves at most "
            f"{fig['cpu_ceiling_rps']:.0f}/s ({fig['cpu_ceiling_fraction']:.0%} of ideal)",
        )
    if "floor_upstream" in rows:
        rows["floor_upstream"].notes.insert(
            0, "info: the floor's I/O plus the same upstream call (aiohttp): scenario 4's floor"
        )
    direct = rows.get("upstream_direct")
    if direct:
        direct.notes.insert(0, "info: the simulator over HTTP, no service in between")
    high = rows.get("high_concurrency")
    if high:
        ideal = HIGH_CONCURRENCY / (HIGH_LATENCY_MS / 1000)
        steady = high.result.steady_rps(skip_s=HIGH_LATENCY_MS / 1000 + 1)
        out["high"] = {
            "ideal_rps": ideal,
            "steady_rps": steady,
            "fraction_of_ideal": steady / ideal,
            "rss_peak_mib": high.result.extra.get("rss_peak_mib"),
            "rss_end_mib": high.result.extra.get("rss_end_mib"),
            "rss_before_mib": high.result.extra.get("rss_before_mib"),
        }
        high.notes.insert(
            0,
            f"steady {steady:.0f}/s = {steady / ideal:.0%} of ideal {ideal:.0f}/s; "
            f"RSS {out['high']['rss_before_mib']:.0f} -> peak {out['high']['rss_peak_mib']:.0f}"
            f" MiB (end {out['high']['rss_end_mib']:.0f})",
        )
    c20, c1000 = rows.get("continuation_20"), rows.get("continuation_1000")
    if c20 and c1000:
        out["continuation_1000_vs_20"] = _ratio(c1000, c20)
        c1000.notes.insert(0, f"{_ratio(c1000, c20):.0%} of the 20-message run")
    c50 = rows.get("continuation_50")
    if c50 and c1000:
        out["continuation_1000_vs_50"] = _ratio(c1000, c50)
        c50.notes.insert(
            0,
            f"info: sessions as long as the history window (HISTORY_MAX_MESSAGES=50); "
            f"2b is {_ratio(c1000, c50):.0%} of this run",
        )
    return out


def print_report(bench: Bench, started: float, machine: dict[str, Any]) -> list[tuple[bool, str]]:
    rows = bench.rows
    extras = derived(bench)
    baseline = rows.get("baseline")
    print()
    print(
        "agentserve bench"
        + (" (--quick: smoke run, not a measurement)" if bench.config.quick else "")
    )
    print(
        f"machine: {machine['nproc']} CPUs, {machine['cpu']}, {machine['memory_gib']} GiB; "
        f"load average at start {machine['loadavg']}, "
        f"at end {[round(x, 2) for x in os.getloadavg()]}"
    )
    print(
        f"wrk: {bench.extra.get('wrk_version', '?')}, -t2, --latency; throughput scenarios "
        f"-c{bench.config.concurrency}, -d{bench.config.duration}s after {bench.config.warmup}s "
        f"of warm-up; scenario 4 -c{UPSTREAM_CONCURRENCY}; scenario 5 -c{HIGH_CONCURRENCY} "
        f"-d{bench.config.high_duration}s"
    )
    print("apps: uvicorn " + " ".join(h.UVICORN_FLAGS))
    print()
    header = (
        f"{'scenario':<36} {'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'errors':>6} {'/base':>6} {'/floor':>6} {'cpu/req':>8}  notes"
    )
    print(header)
    print("-" * len(header))
    for row in rows.values():
        r = row.result
        vs_floor = _ratio(row, rows.get(row.floor)) if row.floor else float("nan")
        vs_base = _ratio(row, baseline)
        print(
            f"{row.label:<36} {r.connections:>5} {r.rps:>9.1f} {r.p50_ms:>8.2f} {r.p99_ms:>8.2f} "
            f"{r.errors:>6} {_pct(vs_base):>6} {_pct(vs_floor):>6} "
            f"{_cpu(r):>8}  {'; '.join(row.notes)}"
        )
    print()
    print("/floor: unique-message rows against 'floor, unique messages', the cache hit against")
    print("'floor, repeated message'. Errors: non-2xx answers plus socket errors and timeouts.")
    print("cpu/req: CPU time (user+system) of the server process during the run / requests;")
    print("it depends much less than req/s on what else runs on the machine.")
    if bench.streams:
        print()
        streams.print_table(bench.streams)

    print()
    print("non-default settings:")
    for name, settings in bench.settings.items():
        print(f"  {name}:")
        for key, value in settings.items():
            print(f"    {key}={value}")
    print(f"  agents file: app/agents.yaml with pool_size={POOL_SIZE} for every agent")

    checks = targets(bench, extras)
    print()
    for ok, text in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    print(f"\nfinished in {time.monotonic() - started:.0f}s; soak: bench/soak.py (make soak)")
    bench.extra["derived"] = extras
    return checks


def targets(bench: Bench, extras: dict[str, Any]) -> list[tuple[bool, str]]:
    rows = bench.rows
    checks: list[tuple[bool, str]] = []

    def ratio_check(key: str, ref: str, minimum: float, text: str, also: str = "") -> None:
        value = _ratio(rows.get(key), rows.get(ref))
        if math.isnan(value):
            return
        a, b = rows[key].result.rps, rows[ref].result.rps
        cpu_a = rows[key].result.extra.get("cpu_ms_per_request", float("nan"))
        cpu_b = rows[ref].result.extra.get("cpu_ms_per_request", float("nan"))
        checks.append(
            (
                value >= minimum,
                f"{text}: {value:.1%} ({a:.0f}/s vs {b:.0f}/s; target >= {minimum:.0%}); "
                f"by CPU per request {cpu_b / cpu_a:.0%} ({cpu_a:.2f} vs {cpu_b:.2f} ms)" + also,
            )
        )

    ratio_check("full_path", "floor_unique", 0.50, "full path vs floor (unique)")
    ratio_check("continuation_20", "floor_unique", 0.40, "continuation vs floor (unique)")
    ratio_check("cache_hit", "floor_repeated", 0.60, "cache hit vs floor (repeated)")
    vs50 = extras.get("continuation_1000_vs_50")
    ratio_check(
        "continuation_1000",
        "continuation_20",
        0.90,
        "continuation 1,000 msgs vs 20 msgs",
        also="" if vs50 is None else f"; vs 50-message sessions (the window): {vs50:.1%}",
    )
    up = extras.get("upstream")
    if up:
        ref = extras.get("floor_upstream")

        def floor_says(text: str) -> str:
            return f"; the floor with the same upstream: {text}" if ref else ""

        met_fraction, met_p50, met_p99 = upstream_met(up)
        checks.append(
            (
                met_fraction,
                f"upstream latency: {up['fraction_of_ideal']:.1%} of the ideal "
                f"{up['ideal_rps']:.0f}/s (steady {up['steady_rps']:.0f}/s; target >= 90%"
                + floor_says(f"{ref['fraction_of_ideal']:.1%}" if ref else "")
                + ")",
            )
        )
        checks.append(
            (
                met_p50,
                f"upstream latency: added p50 {up['added_p50_ms']:.1f} ms (target <= 5 ms"
                + floor_says(f"{ref['added_p50_ms']:.1f} ms" if ref else "")
                + ")",
            )
        )
        checks.append(
            (
                met_p99,
                f"upstream latency: added p99 {up['added_p99_ms']:.1f} ms (target <= 30 ms"
                + floor_says(f"{ref['added_p99_ms']:.1f} ms" if ref else "")
                + ")",
            )
        )
    high = extras.get("high")
    if high:
        errors = rows["high_concurrency"].result.errors
        completed = rows["high_concurrency"].result.requests
        checks.append(
            (
                errors == 0 and completed > 0,
                f"high concurrency: {errors} errors in {completed} answers (target 0 errors)",
            )
        )
        checks.append(
            (
                high["fraction_of_ideal"] >= 0.90,
                f"high concurrency: {high['fraction_of_ideal']:.1%} of the ideal "
                f"{high['ideal_rps']:.0f}/s (steady {high['steady_rps']:.0f}/s; target >= 90%)",
            )
        )
        checks.append(
            (
                high["rss_peak_mib"] <= RSS_LIMIT_MIB,
                f"high concurrency: server RSS peak {high['rss_peak_mib']:.0f} MiB, end "
                f"{high['rss_end_mib']:.0f} MiB (target <= {RSS_LIMIT_MIB:.0f} MB)",
            )
        )
    checks.extend(streams.targets(bench.streams))
    failing = [
        f"{key} {row.result.errors} ({row.result.error_detail()})"
        for key, row in rows.items()
        if row.result.errors
    ]
    failing += [
        f"{key} {result.error_count} ({dict(result.errors)})"
        for key, result in bench.streams.items()
        if result.error_count
    ]
    checks.append(
        (
            not failing,
            "errors: none in any scenario" if not failing else "errors: " + ", ".join(failing),
        )
    )
    return checks


def to_json(
    bench: Bench, machine: dict[str, Any], checks: list[tuple[bool, str]]
) -> dict[str, Any]:
    return {
        "machine": machine,
        "config": {k: str(v) for k, v in vars(bench.config).items()},
        "settings": bench.settings,
        "rows": {
            key: {
                "label": row.label,
                "connections": row.result.connections,
                "rps": row.result.rps,
                "p50_ms": row.result.p50_ms,
                "p99_ms": row.result.p99_ms,
                "errors": row.result.errors,
                "notes": row.notes,
                "wrk": row.result.data,
                "extra": row.result.extra,
            }
            for key, row in bench.rows.items()
        },
        "streams": {key: result.summary() for key, result in bench.streams.items()},
        "extra": bench.extra,
        "checks": [{"pass": ok, "text": text} for ok, text in checks],
    }


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    config = Config.from_args(argv)
    h.install_signal_handlers()
    machine = h.machine_info()
    with h.exit_codes():
        wrk_binary = h.ensure_wrk()
        nofile = h.raise_nofile()
        if nofile < HIGH_CONCURRENCY * 2 + 100:
            h.log(f"warning: RLIMIT_NOFILE is {nofile}; scenario 5 needs about 2,100")
        wrk = h.Wrk(wrk_binary)
        with h.RunResources(config.keep_logs) as res:
            bench = Bench(config, res, wrk)
            bench.extra["wrk_version"] = h.wrk_version(wrk_binary)
            bench.run_baseline()
            bench.run_floor()
            sessions20 = h.prepare_sessions(res, config.sessions20, 20, first_index=0)
            sessions1000 = h.prepare_sessions(res, config.sessions, 1000, first_index=10**6)
            sessions50 = None
            if not config.quick:
                sessions50 = h.prepare_sessions(res, config.sessions, 50, first_index=2 * 10**6)
            bench.run_service_inprocess(sessions20, sessions1000, sessions50)
            bench.run_service_upstream()
            bench.streams = streams.run_all(
                res,
                bench.settings,
                duration=config.duration,
                warmup=config.warmup,
                high_duration=config.high_duration,
                pool_size=POOL_SIZE,
            )
    checks = print_report(bench, started, machine)
    if config.json_path is not None:
        config.json_path.write_text(json.dumps(to_json(bench, machine, checks), indent=2))
    errors = any(row.result.errors for row in bench.rows.values()) or any(
        result.error_count for result in bench.streams.values()
    )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
