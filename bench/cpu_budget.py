"""How much CPU a turn may spend and still meet scenario 4's targets on this machine.

    .venv/bin/python bench/cpu_budget.py [--extra 0 250 500 1000] [--duration 10] [--rounds 1]

Scenario 4 (c=32 against an upstream answering after 50 ms) asks for >= 90 % of the ideal
640 requests/s and at most +5 ms at p50 and +30 ms at p99 over the upstream's 50 ms. With
one worker, every turn's CPU runs on one event loop, so how close a server comes depends on
how much CPU a turn costs. This script measures that dependence directly, in one run: the
floor of scenario 4 (bench/apps/floor.py with the upstream: the irreducible I/O of a turn
plus the same upstream call, nothing else) with `--extra` microseconds of pure Python work
added to each request (half before the upstream call, half after), then the service itself,
all against the same simulator process, under the same wrk load as bench/run.py's
scenario 4. It prints, per variant, the measured CPU per request, the requests/s as a
fraction of the ideal, the added p50 and p99, and which targets it meets.

Read the result as the budget: the largest CPU per request (the measured column, not the
nominal extra) that still meets the targets here. The added work is pure CPU, without the
extra awaits a real turn makes, so the curve is a lower bound of what a turn at that CPU
gets. Rounds (``--rounds``) repeat the whole sweep, interleaved, because this machine is
shared. Exit status: 0 when it measured, 1 when a run had errors, 2 when it could not run,
130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

import harness as h
import run


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--extra",
        type=float,
        nargs="+",
        default=[0, 250, 500, 1000],
        help="microseconds of CPU added to the floor per request (default: 0 250 500 1000)",
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=int, default=3, help="seconds of warm-up per run")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sweep (interleaved)")
    parser.add_argument("--no-service", action="store_true", help="only the floor variants")
    return parser.parse_args(argv)


def _sweep(bench: run.Bench, sim_url: str, extras: list[float], service: bool, tag: str) -> None:
    res = bench.res
    for extra in dict.fromkeys(extras):  # each value once: rows are keyed by it
        server = h.floor_server(
            res,
            db_pool_size=run.DB_POOL_SIZE,
            db_max_overflow=run.DB_MAX_OVERFLOW,
            upstream_url=f"{sim_url}/v1",
            extra_cpu_us=extra,
        ).start()
        try:
            bench.measure(
                f"floor+{extra:g}{tag}",
                f"floor + upstream + {extra:g} us{tag}",
                server,
                "upstream_latency",
                connections=run.UPSTREAM_CONCURRENCY,
            )
        finally:
            server.stop()
    if service:
        settings = h.service_settings(
            res,
            pool_size=run.POOL_SIZE,
            db_pool_size=run.DB_POOL_SIZE,
            llm_base_url=f"{sim_url}/v1",
            llm_max_connections=run.POOL_SIZE,
        )
        server = h.service_server(res, settings, name="service-upstream").start()
        try:
            bench.measure(
                f"service{tag}",
                f"service (scenario 4){tag}",
                server,
                "upstream_latency",
                connections=run.UPSTREAM_CONCURRENCY,
            )
        finally:
            server.stop()


def _report(bench: run.Bench) -> None:
    print()
    print(
        f"{'variant':<34}{'cpu/req':>9}{'steady/s':>10}{'of ideal':>10}{'+p50 ms':>9}"
        f"{'+p99 ms':>9}  targets (>= 90 %, +5 ms, +30 ms)"
    )
    print("-" * 111)
    for row in bench.rows.values():
        result = row.result
        cpu_ms = float(result.extra.get("cpu_ms_per_request", float("nan")))
        fig = run.upstream_figures(result)
        verdict = " ".join("met" if ok else "MISSED" for ok in run.upstream_met(fig))
        errors = f"  {result.errors} errors" if result.errors else ""
        print(
            f"{row.label:<34}{cpu_ms:>7.2f}ms{fig['steady_rps']:>10.1f}"
            f"{fig['fraction_of_ideal']:>10.1%}{fig['added_p50_ms']:>+9.1f}"
            f"{fig['added_p99_ms']:>+9.1f}  {verdict}{errors}"
        )
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    h.install_signal_handlers()
    h.log(f"load average at the start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    config = run.Config.from_args(
        ["--skip-micro", "--duration", str(args.duration), "--warmup", str(args.warmup)]
    )
    with h.exit_codes():
        wrk = h.Wrk(h.ensure_wrk())
        with h.RunResources() as res:
            bench = run.Bench(config, res, wrk)
            sim = h.simulator_server(res, run.UPSTREAM_LATENCY_MS).start()
            try:
                bench.measure(
                    "direct",
                    "the 50 ms upstream alone",
                    sim,
                    "simulator_direct",
                    connections=run.UPSTREAM_CONCURRENCY,
                )
                for index in range(args.rounds):
                    tag = f" #{index + 1}" if args.rounds > 1 else ""
                    _sweep(bench, sim.url, args.extra, not args.no_service, tag)
            finally:
                sim.stop()
    _report(bench)
    return 1 if any(row.result.errors for row in bench.rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
