-- wrk script: POST a small image-generation request; print one JSON line of results.
wrk.method = "POST"
wrk.body = '{"model": "gpt-image-1", "prompt": "a lighthouse at dawn", "size": "16x16"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-key-0123456789"
-- BENCH_RETRY_COUNT=0 sends what the official SDK sends on a first attempt (the requests
-- the proxy records for their retries: README "Retries").
if os.getenv("BENCH_RETRY_COUNT") then
  wrk.headers["X-Stainless-Retry-Count"] = os.getenv("BENCH_RETRY_COUNT")
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "socket_errors": %d, "non_2xx": %d, ' ..
    '"p50_us": %d, "p99_us": %d, "bytes": %d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), summary.bytes))
end
