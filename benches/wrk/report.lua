-- Prints one machine-readable line for benches/compare.sh at the end of a wrk run.
-- Used alone for a fixed URL (wrk then sends one prebuilt request), or loaded by the
-- scripts that vary the URL. Latencies are in microseconds.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d max_us=%d socket_errors=%d status_errors=%d\n",
    summary.requests, summary.duration, summary.requests / summary.duration * 1e6,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect + e.read + e.write + e.timeout, e.status))
end
