-- I/O floor with one repeated message (its Redis GET hits).
local bench = dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")
setup, init, response, done = bench.setup, bench.init, bench.response, bench.done

local body = bench.body((assert(os.getenv("BENCH_MESSAGE"), "BENCH_MESSAGE is not set")))

function request()
  return bench.post(body)
end
