-- Scenario 5, high concurrency: 1,000 connections, the upstream answers after 2 s. The
-- first request of every connection waits a random 0..BENCH_SPREAD_MS, so that the
-- connections do not move in lock-step waves.
local bench = dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")
setup, init, response, done = bench.setup, bench.init, bench.response, bench.done

function request()
  return bench.post(bench.body(bench.unique_message()))
end

delay = bench.delay
