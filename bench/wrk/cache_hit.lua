-- Scenario 3, cache hit: the same message on a fresh session every time (Redis hit, the
-- turn is still recorded).
local bench = dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")
setup, init, response, done = bench.setup, bench.init, bench.response, bench.done

local body = bench.body((assert(os.getenv("BENCH_MESSAGE"), "BENCH_MESSAGE is not set")))

function request()
  return bench.post(body)
end
