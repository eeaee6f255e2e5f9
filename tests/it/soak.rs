//! Soak: a real `permgate serve` process driven at full speed with mixed hits, misses and bad
//! requests. Ignored by default (it runs for a minute); run it with
//!
//! ```sh
//! cargo test --release --test it soak -- --ignored --nocapture
//! ```
//!
//! `SOAK_SECONDS` changes the duration. It asserts that no request gets an unexpected answer
//! and that resident memory stays within `cache.max_bytes` plus a fixed overhead.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use permgate::mock_upstream::MockUpstream;

use crate::support::*;

const CACHE_BYTES: u64 = 8 * 1024 * 1024;
/// Runtime, TLS roots, per-connection buffers for the callers' and upstream connections, the
/// allocator's slack: measured around 20 MiB; this leaves room.
const OVERHEAD_BYTES: u64 = 48 * 1024 * 1024;
const CALLERS: usize = 32;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a one-minute load test; run it explicitly (see the module docs)"]
async fn a_minute_at_full_speed_stays_correct_and_bounded() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let mock = MockUpstream::new(ADMIN_KEY);
    mock.set_recording(false);
    // Misses page through a big list, so each stores a full page (~10 KB) and the cache
    // overruns its byte budget many times over during the run.
    let big = "ft:gpt-4o-mini-2024-07-18:acme:soak:000";
    mock.seed(big, 5000);
    let ids = Arc::new(mock.permission_ids(big));
    let (mock_addr, _stop) = serve_mock(&mock).await;

    let dir = std::env::temp_dir().join(format!("permgate-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("permgate.toml");
    let text = base_config(mock_addr)
        .replace("[cache]", &format!("[cache]\nmax_bytes = {CACHE_BYTES}"))
        .replace(
            "checkpoints = [\"ft:gpt-4o-mini-2024-07-18:acme:*\"]",
            "checkpoints = [\"*\"]",
        );
    std::fs::write(&config, text).unwrap();
    let (mut child, addr) = spawn_serve(&config, &[("OPENAI_ADMIN_KEY", ADMIN_KEY)]).await;
    let pid = child.0.id();
    let baseline = rss_bytes(pid);

    let running = Arc::new(AtomicBool::new(true));
    let (total, unexpected) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let misses = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for caller in 0..CALLERS {
        let (running, total, unexpected, misses) = (
            running.clone(),
            total.clone(),
            unexpected.clone(),
            misses.clone(),
        );
        let ids = ids.clone();
        let client = TestClient::new(addr);
        callers.push(tokio::spawn(async move {
            let mut n = caller as u64;
            while running.load(Ordering::Relaxed) {
                n += CALLERS as u64;
                // 60% hits on 10 hot pages, 25% misses on ever-new keys, 15% bad requests.
                let (path, token, want) = match n % 20 {
                    0..=11 => (
                        format!("{}?limit={}", list_path(CP), n % 10 + 1),
                        READER,
                        200,
                    ),
                    12..=16 => {
                        let m = misses.fetch_add(1, Ordering::Relaxed) as usize;
                        let order = if (m / ids.len()).is_multiple_of(2) {
                            "ascending"
                        } else {
                            "descending"
                        };
                        let after = &ids[m % ids.len()];
                        let path =
                            format!("{}?limit=100&order={order}&after={after}", list_path(big));
                        (path, READER, 200)
                    }
                    17 | 18 => (format!("{}?limit=0", list_path(CP)), READER, 400),
                    _ => (list_path(CP), "not-a-client", 401),
                };
                let r = client.get(&path, token).await;
                total.fetch_add(1, Ordering::Relaxed);
                if r.status != want {
                    unexpected.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    let mut peak = baseline;
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak = peak.max(rss_bytes(pid));
    }
    running.store(false, Ordering::Relaxed);
    for caller in callers {
        caller.await.unwrap();
    }
    let total = total.load(Ordering::Relaxed);
    let rate = total as f64 / started.elapsed().as_secs_f64();
    println!(
        "soak: {total} requests in {seconds} s ({rate:.0}/s), {} misses, upstream saw {}, RSS {} MiB at start, peak {} MiB (budget {} + {} MiB)",
        misses.load(Ordering::Relaxed),
        mock.served(),
        baseline >> 20,
        peak >> 20,
        CACHE_BYTES >> 20,
        OVERHEAD_BYTES >> 20,
    );
    signal(&child, "TERM");
    let status = child.0.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();

    assert_eq!(unexpected.load(Ordering::Relaxed), 0, "unexpected answers");
    assert!(total > 1000, "the gateway kept serving ({total} requests)");
    assert!(
        peak <= CACHE_BYTES + OVERHEAD_BYTES,
        "RSS peaked at {peak} bytes"
    );
    assert!(
        status.success(),
        "clean shutdown after the soak: {status:?}"
    );
}
