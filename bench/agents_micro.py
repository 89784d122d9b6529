"""Agent micro-benchmarks, in process (no HTTP): the pool and the agents as the service
wires them (app.runtime.build_pools with the packaged agents.yaml, the in-process
simulator, Prometheus observers on a private registry).

* pool acquire + release: ``await pool.acquire(); pool.release(agent)`` in batches of
  1,000, time per batch / 1,000, median over the batches (also ``async with pool.lease()``,
  which is what QueryService uses, and a bare pool without metrics hooks, for reference);
* agent build: ``Agent(spec, chain, tools, model_id=..., tool_schemas=...)`` as in
  build_pools, 1,000 builds timed one by one after a warm-up, median per build;
* agent memory: tracemalloc over 1,000 live instances, bytes per instance.

Usage: ``.venv/bin/python bench/agents_micro.py [--quick] [--json]``. bench/run.py runs it
as a subprocess (so its timings are not disturbed by the harness) and reads the JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from prometheus_client import CollectorRegistry  # noqa: E402

from app.agents.agent import Agent  # noqa: E402
from app.agents.pool import AgentPool  # noqa: E402
from app.agents.spec import load_agent_specs  # noqa: E402
from app.agents.tools import builtin_registry  # noqa: E402
from app.config import PACKAGED_AGENTS_FILE, Settings  # noqa: E402
from app.llm.gateway import LLMGateway  # noqa: E402
from app.observability.metrics import Metrics  # noqa: E402
from app.runtime import build_pools  # noqa: E402

TARGETS = {"pool_acquire_release_us": 5.0, "agent_build_us": 7.0, "agent_bytes": 3.6 * 1024}


def _median_batches(samples: list[float]) -> float:
    return statistics.median(samples)


async def _pool_batches(pool: AgentPool[Any], batches: int, per_batch: int) -> list[float]:
    """ns per acquire+release, one figure per batch."""
    results = []
    acquire, release = pool.acquire, pool.release
    for _ in range(batches):
        started = time.perf_counter_ns()
        for _ in range(per_batch):
            agent = await acquire()
            release(agent)
        results.append((time.perf_counter_ns() - started) / per_batch)
    return results


async def _lease_batches(pool: AgentPool[Any], batches: int, per_batch: int) -> list[float]:
    results = []
    for _ in range(batches):
        started = time.perf_counter_ns()
        for _ in range(per_batch):
            async with pool.lease():
                pass
        results.append((time.perf_counter_ns() - started) / per_batch)
    return results


def _wired() -> tuple[Settings, dict[str, Any], Any, LLMGateway, dict[str, AgentPool[Agent]]]:
    settings = Settings(_env_file=None, agents_file=PACKAGED_AGENTS_FILE)
    specs = load_agent_specs(settings.agents_file)
    tools = builtin_registry()
    metrics = Metrics(CollectorRegistry(auto_describe=True))
    gateway = LLMGateway(settings, observer=metrics, on_breaker_change=metrics.on_breaker_change)
    pools = build_pools(settings, specs, tools, gateway, metrics)
    return settings, specs, tools, gateway, pools


def bench_pool(batches: int, per_batch: int = 1000) -> dict[str, Any]:
    _, _, _, gateway, pools = _wired()
    pool = pools["assistant"]
    bare: AgentPool[object] = AgentPool(
        "bare", [object() for _ in range(pool.size)], acquire_timeout=5.0, max_waiting=64
    )

    async def measure() -> dict[str, list[float]]:
        await _pool_batches(pool, max(5, batches // 10), per_batch)  # warm-up
        await _lease_batches(pool, max(5, batches // 10), per_batch)
        await _pool_batches(bare, max(5, batches // 10), per_batch)
        return {
            "acquire_release": await _pool_batches(pool, batches, per_batch),
            "lease": await _lease_batches(pool, batches, per_batch),
            "bare_acquire_release": await _pool_batches(bare, batches, per_batch),
        }

    try:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            samples = runner.run(measure())
            loop = "uvloop"
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        samples = asyncio.run(measure())
        loop = "asyncio"
    asyncio.run(gateway.aclose())
    return {
        "loop": loop,
        "batches": batches,
        "per_batch": per_batch,
        "pool_acquire_release_us": _median_batches(samples["acquire_release"]) / 1000,
        "pool_lease_us": _median_batches(samples["lease"]) / 1000,
        "bare_pool_acquire_release_us": _median_batches(samples["bare_acquire_release"]) / 1000,
    }


def bench_build(builds: int = 1000, warmup: int = 1000) -> dict[str, Any]:
    settings, specs, tools, _, _ = _wired()
    gateway = LLMGateway(settings)
    results: dict[str, Any] = {"builds": builds}
    per_agent: dict[str, dict[str, float]] = {}
    for spec in specs.values():
        model_id = spec.model or settings.llm_model
        chain = gateway.chain_for((model_id, *spec.fallback_models))
        schemas = tools.schemas(spec.tools)

        def build(
            spec: Any = spec, chain: Any = chain, schemas: Any = schemas, model_id: str = model_id
        ) -> Agent:
            return Agent(spec, chain, tools, model_id=model_id, tool_schemas=schemas)

        keep: list[Agent | None] = [None] * (builds + warmup)
        for i in range(warmup):
            keep[i] = build()
        timer = time.perf_counter_ns
        times = []
        for i in range(warmup, warmup + builds):
            started = timer()
            keep[i] = build()
            times.append(timer() - started)
        del keep
        overhead = statistics.median(_timer_overhead(builds))

        gc.collect()
        holder: list[Agent | None] = [None] * builds
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(builds):
            holder[i] = build()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del holder
        per_agent[spec.name] = {
            "build_us": statistics.median(times) / 1000,
            "timer_overhead_us": overhead / 1000,
            "bytes": (after - before) / builds,
        }
    results["agents"] = per_agent
    results["agent_build_us"] = max(a["build_us"] for a in per_agent.values())
    results["agent_bytes"] = max(a["bytes"] for a in per_agent.values())
    return results


def _timer_overhead(n: int) -> list[int]:
    timer = time.perf_counter_ns
    out = []
    for _ in range(n):
        started = timer()
        out.append(timer() - started)
    return out


def run(quick: bool = False) -> dict[str, Any]:
    batches = 50 if quick else 300
    result = {**bench_pool(batches), **bench_build()}
    result["targets"] = TARGETS
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches (smoke run)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    result = run(args.quick)
    if args.json:
        print(json.dumps(result))
        return
    print(f"pool acquire+release (as wired): {result['pool_acquire_release_us']:.3f} us median")
    print(f"pool lease() context manager:    {result['pool_lease_us']:.3f} us median")
    print(f"bare pool acquire+release:       {result['bare_pool_acquire_release_us']:.3f} us")
    for name, agent in result["agents"].items():
        print(
            f"agent {name!r}: build {agent['build_us']:.3f} us median "
            f"(timer overhead {agent['timer_overhead_us']:.3f} us), "
            f"{agent['bytes']:.0f} bytes per live instance"
        )


if __name__ == "__main__":
    main()
