-- Scenario 1, full path: a new session and a unique message per request (cache miss,
-- in-process simulator, turn written to Postgres).
local bench = dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")
setup, init, response, done = bench.setup, bench.init, bench.response, bench.done

function request()
  return bench.post(bench.body(bench.unique_message()))
end
