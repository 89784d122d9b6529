"""The bench's streaming scenarios, and the SSE load client they need (wrk cannot look inside
a stream).

The client (aiohttp) keeps `c` streams open in a closed loop for the run's duration: each
worker starts its next stream when the last one has ended. It records, per stream, the time
from sending the request to the first text delta (TTFB of the answer's text), and per delta
the gap since the one before. It speaks two dialects: agentserve's /query (`event: delta`
events, then `done`, or `error`), and the simulator's own /v1/chat/completions (`data:`
chunks, those with `delta.content` the text, then `data: [DONE]`).

The scenarios (one simulator process, one service process with the simulator as its HTTP
upstream, as in scenarios 4-5):

* S1 the simulator alone at c=8, streaming 20 text chunks, the first 50 ms after the
  request, then one every 10 ms; the baseline for S2;
* S2 the service at c=8 with that simulator behind it: TTFB at most +3 ms p50 and +15 ms
  p99 over S1, and the gaps kept (p50 within 2 ms of 10 ms);
* S3 the service with 1,000 concurrent streams on a 2 s upstream: no errors, RSS <= 400 MiB.
"""

from __future__ import annotations

import asyncio
import math
import random
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import harness as h
import orjson
import uvloop

CONCURRENCY = 8
TTFT_MS, GAP_MS = 50.0, 10.0
"""The simulator's shape: the first text chunk 50 ms after the request, then one every 10 ms."""
HIGH_STREAMS, HIGH_LATENCY_MS = 1000, 2000.0
MAX_ADDED_TTFB_P50_MS, MAX_ADDED_TTFB_P99_MS, MAX_GAP_ERROR_MS = 3.0, 15.0, 2.0
RSS_LIMIT_MIB = 400.0
SYSTEM_PROMPT = "You are a helpful, concise assistant."

Dialect = Literal["agentserve", "openai"]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; NaN when there are no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


@dataclass
class StreamResult:
    label: str
    concurrency: int
    duration_s: float = 0.0
    """From the first request to the end of the last stream."""
    streams: int = 0
    """Streams that ended well (`done`, or `[DONE]`)."""
    deltas: int = 0
    ttfb_ms: list[float] = field(default_factory=list, repr=False)
    gaps_ms: list[float] = field(default_factory=list, repr=False)
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "concurrency": self.concurrency,
            "duration_s": self.duration_s,
            "streams": self.streams,
            "streams_per_s": self.streams / self.duration_s if self.duration_s else math.nan,
            "deltas_per_stream": self.deltas / self.streams if self.streams else math.nan,
            "ttfb_p50_ms": percentile(self.ttfb_ms, 0.50),
            "ttfb_p99_ms": percentile(self.ttfb_ms, 0.99),
            "gap_p50_ms": percentile(self.gaps_ms, 0.50),
            "gap_p99_ms": percentile(self.gaps_ms, 0.99),
            "errors": dict(self.errors),
            "error_samples": self.error_samples[:5],
            **self.extra,
        }


class _Stream:
    """One stream's timings, kept only if it ends well."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.last: float | None = None
        self.ttfb_ms = math.nan
        self.gaps_ms: list[float] = []

    def delta(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.ttfb_ms = (now - self.started) * 1000
        else:
            self.gaps_ms.append((now - self.last) * 1000)
        self.last = now


async def _read(response: aiohttp.ClientResponse, dialect: Dialect, stream: _Stream) -> str | None:
    """Read the body to its end; None if it ended well, else what went wrong."""
    event = b""
    outcome: str | None = "ended without done"
    async for raw in response.content:
        line = raw.rstrip(b"\r\n")
        if not line.startswith(b"data:"):
            if line.startswith(b"event:"):
                event = line[6:].strip()
            continue
        data = line[5:].strip()
        if dialect == "agentserve":
            if event == b"delta":
                stream.delta()
            elif event == b"done":
                outcome = None
            elif event == b"error":
                outcome = f"error event: {data[:200].decode(errors='replace')}"
        elif data == b"[DONE]":
            outcome = None
        elif (orjson.loads(data).get("choices") or [{}])[0].get("delta", {}).get("content"):
            stream.delta()
    return outcome


class Client:
    """`concurrency` workers, each streaming one answer after the other until `duration`
    seconds have passed (a stream under way then is finished and counted)."""

    def __init__(self, url: str, dialect: Dialect, result: StreamResult) -> None:
        self.url = url
        self.dialect = dialect
        self.result = result
        self.tag = secrets.token_hex(4)
        self.count = 0

    def body(self) -> dict[str, Any]:
        # eight words, each one simulator token: every answer has the same shape (20 deltas)
        self.count += 1
        message = f"{self.tag} {self.count:08d} please stream this answer to me"
        if self.dialect == "agentserve":
            return {"message": message, "stream": True}
        return {
            "model": "simulator",
            "max_tokens": 1024,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": message},
            ],
        }

    async def one(self, session: aiohttp.ClientSession) -> None:
        result = self.result
        stream = _Stream(time.perf_counter())
        try:
            async with session.post(self.url, json=self.body()) as response:
                if response.status != 200:
                    problem: str | None = f"HTTP {response.status}"
                    text = (await response.text())[:200]
                    result.error_samples.append(f"{problem}: {text}")
                else:
                    problem = await _read(response, self.dialect, stream)
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = type(exc).__name__
            result.error_samples.append(repr(exc)[:200])
        if problem is None and stream.last is not None:
            result.streams += 1
            result.deltas += len(stream.gaps_ms) + 1
            result.ttfb_ms.append(stream.ttfb_ms)
            result.gaps_ms.extend(stream.gaps_ms)
        else:
            kind = problem or "no delta"
            result.errors[kind.split(":")[0]] += 1
            if problem and problem.startswith("error event"):
                result.error_samples.append(problem)

    async def run(self, duration: float, spread_s: float = 0.0) -> None:
        deadline = time.monotonic() + duration
        connector = aiohttp.TCPConnector(limit=self.result.concurrency)
        timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_read=30)

        async def worker(session: aiohttp.ClientSession) -> None:
            if spread_s:  # so that 1,000 streams do not move in lock-step waves
                await asyncio.sleep(random.uniform(0, spread_s))
            while time.monotonic() < deadline:
                await self.one(session)

        started = time.monotonic()
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await asyncio.gather(*(worker(session) for _ in range(self.result.concurrency)))
        self.result.duration_s = time.monotonic() - started


def run_streams(
    label: str,
    server: h.Server,
    dialect: Dialect,
    *,
    concurrency: int,
    duration: int,
    warmup: int,
    spread_s: float = 0.0,
    sample_rss: bool = False,
) -> StreamResult:
    """A warm-up run, then the measured one, with the server's CPU (and RSS) around it."""
    path = "/query" if dialect == "agentserve" else "/v1/chat/completions"
    if warmup > 0:
        warm = StreamResult(f"{label} (warm-up)", concurrency)
        uvloop.run(Client(server.url + path, dialect, warm).run(warmup, spread_s))
        server.settle()
    h.log(f"measuring {label}: {concurrency} streams for {duration}s ({path})")
    result = StreamResult(label, concurrency)
    cpu_before, client_cpu_before = server.cpu_seconds(), time.process_time()
    result.extra["rss_before_mib"] = server.rss_mib()
    client = Client(server.url + path, dialect, result)
    if sample_rss:
        with h.RSSSampler(server) as sampler:
            uvloop.run(client.run(duration, spread_s))
        result.extra["rss_peak_mib"] = sampler.peak
        result.extra["rss_end_mib"] = sampler.last
    else:
        uvloop.run(client.run(duration, spread_s))
    cpu = server.cpu_seconds() - cpu_before
    result.extra["cpu_ms_per_stream"] = cpu * 1000 / result.streams if result.streams else math.nan
    # the client shares the machine with the servers: what it took is in the notes
    client_cpu = time.process_time() - client_cpu_before
    result.extra["client_cpu_share"] = client_cpu / result.duration_s if result.duration_s else 0.0
    if not server.alive():
        raise h.BenchError(f"{server.name} died during {label}:\n{server.tail()}")
    s = result.summary()
    h.log(
        f"  {s['streams_per_s']:.1f} streams/s  TTFB p50 {s['ttfb_p50_ms']:.2f} ms "
        f"p99 {s['ttfb_p99_ms']:.2f} ms  gap p50 {s['gap_p50_ms']:.2f} ms  errors "
        f"{result.error_count}" + (f" {dict(result.errors)}" if result.errors else "")
    )
    return result


def calibrate(sim: h.Server) -> dict[str, float]:
    """The simulator's knobs for TTFT_MS, then a chunk every GAP_MS: it spreads
    per_token_latency_ms x tokens over the answer's chunks, so one request (knobs at zero)
    counts both; the first chunk comes one gap after latency_ms."""
    set_knobs(sim, latency_ms=0, per_token_latency_ms=0)
    body = Client(sim.url, "openai", StreamResult("probe", 1)).body()
    status, _, raw = h.http("POST", sim.url + "/v1/chat/completions", body)
    if status != 200:
        raise h.BenchError(f"simulator probe failed: {status} {raw[:200]!r}")
    chunks, tokens = 0, 0
    for line in raw.splitlines():
        if line.startswith(b"data: {"):
            chunk = orjson.loads(line[6:])
            choices = chunk.get("choices") or [{}]
            chunks += bool(choices[0].get("delta", {}).get("content"))
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
    if not chunks or not tokens:
        raise h.BenchError(f"simulator probe: {chunks} text chunks, {tokens} tokens")
    knobs = {"latency_ms": TTFT_MS - GAP_MS, "per_token_latency_ms": GAP_MS * chunks / tokens}
    set_knobs(sim, **knobs)
    return {**knobs, "chunks": chunks, "tokens": tokens}


def set_knobs(sim: h.Server, **knobs: float) -> None:
    status, _, body = h.http("PUT", sim.url + "/sim/knobs", knobs)
    if status != 200:
        raise h.BenchError(f"simulator refused {knobs}: {status} {body[:200]!r}")


def run_all(
    res: h.RunResources, settings_out: dict[str, dict[str, str]], *, duration: int,
    warmup: int, high_duration: int, pool_size: int,
) -> dict[str, StreamResult]:  # fmt: skip
    """S1-S3 (see the module docstring), each on fresh processes of their own."""
    results: dict[str, StreamResult] = {}
    sim = h.simulator_server(res, TTFT_MS, name="simulator-streams").start()
    try:
        knobs = calibrate(sim)
        settings_out["simulator (streaming)"] = {
            "knobs": f"latency_ms={knobs['latency_ms']:g}, "
            f"per_token_latency_ms={knobs['per_token_latency_ms']:.4g} "
            f"({knobs['chunks']:g} text chunks of {knobs['tokens']:g} tokens)",
            "S3": f"latency_ms={HIGH_LATENCY_MS - GAP_MS:g}",
        }
        results["stream_sim"] = run_streams(
            "S1. the simulator alone, streaming", sim, "openai",
            concurrency=CONCURRENCY, duration=duration, warmup=warmup,
        )  # fmt: skip
        settings = h.service_settings(
            res, pool_size=pool_size, llm_base_url=f"{sim.url}/v1", llm_max_connections=pool_size
        )
        settings_out["service (streaming)"] = settings
        server = h.service_server(res, settings, name="service-streams").start()
        try:
            results["stream_service"] = run_streams(
                "S2. service, streaming", server, "agentserve",
                concurrency=CONCURRENCY, duration=duration, warmup=warmup,
            )  # fmt: skip
            set_knobs(sim, latency_ms=HIGH_LATENCY_MS - GAP_MS)
            results["stream_high"] = run_streams(
                "S3. 1,000 streams, upstream 2 s", server, "agentserve",
                concurrency=HIGH_STREAMS, duration=high_duration, warmup=0,
                spread_s=HIGH_LATENCY_MS / 1000, sample_rss=True,
            )  # fmt: skip
            stream_s = (HIGH_LATENCY_MS + (knobs["chunks"] - 1) * GAP_MS) / 1000
            results["stream_high"].extra["ideal_streams_per_s"] = HIGH_STREAMS / stream_s
        finally:
            server.stop()
    finally:
        sim.stop()
    return results


def print_table(results: dict[str, StreamResult]) -> None:
    header = (
        f"{'streaming scenario':<36} {'conc':>5} {'streams/s':>9} {'TTFB p50':>9} "
        f"{'TTFB p99':>9} {'gap p50':>8} {'gap p99':>8} {'errors':>6} {'cpu/strm':>9}  notes"
    )
    print(header)
    print("-" * len(header))
    for result in results.values():
        s = result.summary()
        notes = [
            f"{s['deltas_per_stream']:.1f} deltas a stream",
            f"client CPU {s['client_cpu_share']:.0%} of a core",
        ]
        if "ideal_streams_per_s" in s:
            ideal = s["ideal_streams_per_s"]
            notes.append(f"{s['streams_per_s'] / ideal:.0%} of the ideal {ideal:.0f}/s")
        if "rss_peak_mib" in s:
            notes.append(f"RSS {s['rss_before_mib']:.0f} -> peak {s['rss_peak_mib']:.0f} MiB")
        if result.errors:
            notes.append(", ".join(f"{k} {n}" for k, n in result.errors.items()))
        print(
            f"{result.label:<36} {result.concurrency:>5} {s['streams_per_s']:>9.1f} "
            f"{s['ttfb_p50_ms']:>9.2f} {s['ttfb_p99_ms']:>9.2f} {s['gap_p50_ms']:>8.2f} "
            f"{s['gap_p99_ms']:>8.2f} {result.error_count:>6} "
            f"{s['cpu_ms_per_stream']:>7.2f}ms  {'; '.join(notes)}"
        )
    print("TTFB: request sent -> first text delta; gap: between two deltas of a stream (ms).")


def targets(results: dict[str, StreamResult]) -> list[tuple[bool, str]]:
    checks: list[tuple[bool, str]] = []
    sim, service = results.get("stream_sim"), results.get("stream_service")
    if sim and service:
        a, b = sim.summary(), service.summary()
        p50 = b["ttfb_p50_ms"] - a["ttfb_p50_ms"]
        p99 = b["ttfb_p99_ms"] - a["ttfb_p99_ms"]
        checks.append(
            (
                p50 <= MAX_ADDED_TTFB_P50_MS and p99 <= MAX_ADDED_TTFB_P99_MS,
                f"streaming TTFB: the service adds {p50:+.1f} ms p50, {p99:+.1f} ms p99 to the "
                f"simulator alone ({a['ttfb_p50_ms']:.1f} / {a['ttfb_p99_ms']:.1f} ms; target "
                f"<= +{MAX_ADDED_TTFB_P50_MS:g} / +{MAX_ADDED_TTFB_P99_MS:g} ms)",
            )
        )
        gap = b["gap_p50_ms"]
        checks.append(
            (
                abs(gap - GAP_MS) <= MAX_GAP_ERROR_MS,
                f"streaming gaps: p50 {gap:.2f} ms, p99 {b['gap_p99_ms']:.2f} ms through the "
                f"service (the simulator alone {a['gap_p50_ms']:.2f} / {a['gap_p99_ms']:.2f}; "
                f"target p50 {GAP_MS:g} +- {MAX_GAP_ERROR_MS:g} ms)",
            )
        )
    high = results.get("stream_high")
    if high:
        s = high.summary()
        checks.append(
            (
                high.error_count == 0 and high.streams > 0,
                f"1,000 streams: {high.error_count} errors in {high.streams} streams "
                f"(target 0 errors)",
            )
        )
        checks.append(
            (
                s["rss_peak_mib"] <= RSS_LIMIT_MIB,
                f"1,000 streams: server RSS peak {s['rss_peak_mib']:.0f} MiB, end "
                f"{s['rss_end_mib']:.0f} MiB (target <= {RSS_LIMIT_MIB:.0f} MiB)",
            )
        )
    return checks
