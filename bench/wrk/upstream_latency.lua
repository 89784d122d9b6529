-- Scenario 4, upstream latency: full path with the simulator as an HTTP upstream that
-- answers after 50 ms.
local bench = dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")
setup, init, response, done = bench.setup, bench.init, bench.response, bench.done

function request()
  return bench.post(bench.body(bench.unique_message()))
end
