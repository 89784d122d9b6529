-- Shared by every bench/wrk/<scenario>.lua script (loaded with dofile by each of them;
-- bench/harness.py runs wrk and reads the result). It counts responses by status and by X-Cache header, buckets completions
-- per second of the monotonic clock (so the harness can compute a steady-state rate that
-- excludes the ramp-up), and prints one machine-readable line from done():
--
--   BENCH_JSON {"requests": ..., "latency_us": {"p50": ...}, "statuses": {...}, ...}
--
-- Configuration comes from the environment (set by bench/harness.py):
--   BENCH_TAG          makes messages unique across runs and warm-ups
--   BENCH_MESSAGE      the repeated message (repeated-message scenarios)
--   BENCH_SESSIONS     file with one session id per line (continuation)
--   BENCH_CONNECTIONS  wrk -c, BENCH_THREADS wrk -t (to split work per thread)
--   BENCH_SPREAD_MS    random delay before each connection's first request (desynchronises
--                      1,000 connections that would otherwise move in lock-step waves)
--   BENCH_RATE         total requests/s to pace at (soak); 0 or unset: as fast as possible

local M = {}

local ffi = require("ffi")
pcall(ffi.cdef, [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]])
local timespec = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1

function M.now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

M.tag = os.getenv("BENCH_TAG") or "t"
M.connections = tonumber(os.getenv("BENCH_CONNECTIONS") or "1")
M.nthreads = tonumber(os.getenv("BENCH_THREADS") or "1")
M.spread_ms = tonumber(os.getenv("BENCH_SPREAD_MS") or "0")
M.rate = tonumber(os.getenv("BENCH_RATE") or "0")

wrk.method = "POST"
wrk.path = "/query"
wrk.headers["Content-Type"] = "application/json"

-- main state: remember the threads so done() can read their counters
local threads = {}

function M.setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

-- per-thread state (each wrk thread runs its own Lua state)
function M.init()
  statuses = {}
  xcache = {}
  buckets = {}
  error_bodies = {}
  started = M.now()
  last = started
  counter = 0
  delays = 0
  math.randomseed(os.time() + 7919 * (id or 1))
  if M.rate > 0 then
    interval = M.nthreads / M.rate
    next_slot = started
  end
end

function M.response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status >= 300 and error_bodies[status] == nil then
    error_bodies[status] = string.sub(body or "", 1, 300)
  end
  local cache = headers["x-cache"] or headers["X-Cache"]
  if cache then
    xcache[cache] = (xcache[cache] or 0) + 1
  end
  local t = M.now()
  local second = math.floor(t)
  buckets[second] = (buckets[second] or 0) + 1
  last = t
end

-- a fresh message for every request: thread id + counter + run tag
function M.unique_message()
  counter = counter + 1
  return "bench " .. M.tag .. " t" .. id .. " n" .. counter .. ": what is new today?"
end

function M.body(message, session_id)
  if session_id then
    return '{"message":"' .. message .. '","session_id":"' .. session_id .. '"}'
  end
  return '{"message":"' .. message .. '"}'
end

function M.post(body)
  return wrk.format("POST", "/query", nil, body)
end

-- this thread's share of the session ids in BENCH_SESSIONS (disjoint across threads, so
-- two connections never continue the same session at once; used round robin)
function M.load_sessions()
  local path = os.getenv("BENCH_SESSIONS")
  assert(path, "BENCH_SESSIONS is not set")
  local mine = {}
  local index = 0
  for line in io.lines(path) do
    if line ~= "" then
      if index % M.nthreads == (id - 1) then
        table.insert(mine, line)
      end
      index = index + 1
    end
  end
  assert(#mine > 0, "no session ids for thread " .. id)
  return mine
end

-- delay(): spread the first request of every connection, then pace at BENCH_RATE if set
function M.delay()
  delays = delays + 1
  local per_thread = math.ceil(M.connections / M.nthreads)
  local ms = 0
  if M.spread_ms > 0 and delays <= per_thread then
    ms = math.random() * M.spread_ms
  end
  if M.rate > 0 then
    local t = M.now()
    if next_slot < t - 1.0 then
      next_slot = t - 1.0 -- fell behind: catch up at most one second of backlog
    end
    local slot = next_slot
    next_slot = next_slot + interval
    local wait = (slot - t) * 1000
    if wait > ms then
      ms = wait
    end
  end
  return math.floor(ms)
end

local function escape(s)
  return (tostring(s):gsub('[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end))
end

local function encode(v)
  local kind = type(v)
  if kind == "table" then
    local parts = {}
    for k, x in pairs(v) do
      parts[#parts + 1] = '"' .. escape(k) .. '":' .. encode(x)
    end
    return "{" .. table.concat(parts, ",") .. "}"
  elseif kind == "number" then
    if v ~= v or v == math.huge or v == -math.huge then
      return "null"
    end
    return string.format("%.17g", v)
  elseif kind == "boolean" then
    return tostring(v)
  elseif kind == "string" then
    return '"' .. escape(v) .. '"'
  end
  return "null"
end

local function add_into(total, part)
  for k, n in pairs(part or {}) do
    local key = tostring(k)
    total[key] = (total[key] or 0) + n
  end
end

function M.done(summary, latency, requests)
  local out = {
    requests = summary.requests,
    duration_us = summary.duration,
    bytes = summary.bytes,
    errors = {
      connect = summary.errors.connect,
      read = summary.errors.read,
      write = summary.errors.write,
      status = summary.errors.status,
      timeout = summary.errors.timeout,
    },
    latency_us = {
      min = latency.min,
      max = latency.max,
      mean = latency.mean,
      stdev = latency.stdev,
      p50 = latency:percentile(50),
      p75 = latency:percentile(75),
      p90 = latency:percentile(90),
      p99 = latency:percentile(99),
      p999 = latency:percentile(99.9),
    },
    statuses = {},
    x_cache = {},
    buckets = {},
    error_bodies = {},
  }
  local first, final = nil, nil
  for _, thread in ipairs(threads) do
    add_into(out.statuses, thread:get("statuses"))
    add_into(out.x_cache, thread:get("xcache"))
    add_into(out.buckets, thread:get("buckets"))
    for status, text in pairs(thread:get("error_bodies") or {}) do
      out.error_bodies[tostring(status)] = text
    end
    local s, l = thread:get("started"), thread:get("last")
    if s and (first == nil or s < first) then
      first = s
    end
    if l and (final == nil or l > final) then
      final = l
    end
  end
  out.started = first
  out.last_response = final
  io.write("BENCH_JSON ", encode(out), "\n")
end

return M
