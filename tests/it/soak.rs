//! Soak: a node under steady load, with connections coming and going, keeps a
//! flat memory profile after warm-up.
//!
//! `SOAK_SECONDS` sets the length (default 60 under `CI`, 10 otherwise); for a
//! long run: `SOAK_SECONDS=3600 cargo test --release --test it soak -- --nocapture`.
//! The resident memory is printed every few seconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use kvmesh::bench::{BenchOptions, ClientIo, Target, run};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_flat_under_steady_load() {
    let _heavy = heavy().await;
    let default = if std::env::var_os("CI").is_some() {
        60
    } else {
        10
    };
    // At least two seconds: the first is warm-up, memory is compared after it.
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
        .max(2);
    let p = spawn_kvmesh(&[]);
    let pid = p.child.id();
    let addr = p.addr;

    // Steady traffic over a fixed key space (so the data itself stops growing).
    let load = tokio::spawn(run(BenchOptions {
        target: Target::Kvmesh,
        addrs: vec![addr.to_string()],
        conns: 16,
        pipeline: 4,
        requests: None,
        duration: Some(Duration::from_secs(seconds)),
        get_percent: 70,
        buckets: vec!["soak1".into(), "soak2".into()],
        keys: 5_000,
        value_size: 64,
        prefill: true,
        subject: None,
        io: ClientIo::Uring,
    }));
    // Connections that come and go, some leaving mid-request.
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));
    let churn = {
        let (stop, churned) = (stop.clone(), churned.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let mut c = LineClient::connect(addr).await;
                c.exchange("PING", "PONG\r\n").await;
                c.send("GET soak1 k1\r\nGET soak1").await;
                churned.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };

    let warm_up = Duration::from_secs(seconds / 5).max(Duration::from_secs(2));
    let mut samples = Vec::new();
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(seconds) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss = rss_kib(pid);
        let at = started.elapsed();
        if at.as_secs().is_multiple_of(5) {
            eprintln!("soak: {:>4} s  {rss} KiB", at.as_secs());
        }
        samples.push((at, rss));
    }
    stop.store(true, Ordering::Relaxed);
    churn.await.expect("churn");
    let report = load.await.expect("load").expect("bench runs");
    assert_eq!(report.errors, 0, "{:?}", report.first_error);

    let after_warm_up: Vec<u64> = samples
        .iter()
        .filter(|(t, _)| *t >= warm_up)
        .map(|(_, r)| *r)
        .collect();
    let (first, max) = (after_warm_up[0], *after_warm_up.iter().max().unwrap_or(&0));
    eprintln!(
        "soak: {} requests, {} connections opened and closed, RSS {first} KiB after warm-up, at most {max} KiB",
        report.ok,
        churned.load(Ordering::Relaxed)
    );
    assert!(
        max <= first + 8 * 1024,
        "memory grew from {first} KiB to {max} KiB after warm-up"
    );
}
