-- Scenario 2, continuation: a unique message on one of the sessions listed in
-- BENCH_SESSIONS (prepared with 20 or 1,000 messages). Each thread goes round robin over its
-- own share, so two requests never continue the same session at once (409 session_busy).
local bench = dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")
setup, init, response, done = bench.setup, bench.init, bench.response, bench.done

local sessions, next_index

local common_init = init
function init(args)
  common_init(args)
  sessions = bench.load_sessions()
  next_index = 0
end

function request()
  next_index = next_index % #sessions + 1
  return bench.post(bench.body(bench.unique_message(), sessions[next_index]))
end
