//! A client over several servers, over real TLS on 127.0.0.1 (each server
//! on its own port, most behind a fault proxy so a test can kill, freeze
//! or restart it): a killed server costs at most its calls in flight and
//! idempotent calls nothing; it gets calls again once back; a frozen one is
//! left within the heartbeat timeout; a slow one is steered around; a
//! drained one costs nothing; discovery adds and removes servers; retries
//! stop at the budget when every server fails.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rpc_client::{discovery, Balance, Client, ClientError, ConnState, HealthStatus};
use rpc_tests::replicas::{builder, calls_at, connected, list, replicas, until, ReplicaClient};
use rpc_tests::FaultProxy;

/// Callers in a loop until `stop`: each returns (calls, errors, first
/// error). At most 100 000 calls each.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<(u64, u64, Option<String>)>>,
}

impl Load {
    fn start(client: &Client, callers: usize, idempotent: bool) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let tasks = (0..callers)
            .map(|i| {
                let replica = ReplicaClient::new(client.clone());
                let (stop, done) = (stop.clone(), done.clone());
                tokio::spawn(async move {
                    let (mut calls, mut errors, mut first) = (0, 0, None);
                    for n in 0..100_000u64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let arg = n * 100 + i as u64;
                        let result = if idempotent {
                            replica.echo(arg).await
                        } else {
                            replica.tally(arg).await
                        };
                        calls += 1;
                        match result {
                            Ok(got) => assert_eq!(got, arg),
                            Err(e) => {
                                errors += 1;
                                first.get_or_insert_with(|| e.to_string());
                            }
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    (calls, errors, first)
                })
            })
            .collect();
        Load { stop, done, tasks }
    }

    /// Waits (at most 20 s) until `n` more calls have ended.
    async fn until_more(&self, n: u64) {
        let target = self.done.load(Ordering::Relaxed) + n;
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.done.load(Ordering::Relaxed) < target {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("calls stopped being made");
    }

    async fn finish(self) -> (u64, u64, Option<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = (0, 0, None);
        for task in self.tasks {
            let (calls, errors, first) = task.await.unwrap();
            total.0 += calls;
            total.1 += errors;
            total.2 = total.2.or(first);
        }
        total
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_costs_at_most_its_calls_in_flight_and_gets_calls_again_when_back() {
    let r = replicas(&[0, 0, 0]).await;
    let proxies = [
        FaultProxy::start(r.servers[0].addr).await,
        FaultProxy::start(r.servers[1].addr).await,
        FaultProxy::start(r.servers[2].addr).await,
    ];
    let client = connected(builder(&r.certs), proxies.iter().map(|p| p.addr)).await;
    let plain = Load::start(&client, 4, false);
    let idempotent = Load::start(&client, 4, true);
    plain.until_more(300).await;
    idempotent.until_more(300).await;

    // Killed: every connection reset, and nothing listens any more.
    let nowhere = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = nowhere.local_addr().unwrap();
    drop(nowhere);
    proxies[0].set_upstream(dead);
    proxies[0].reset_all();
    plain.until_more(1000).await;
    idempotent.until_more(1000).await;
    let killed = proxies[0].addr;
    let calls_when_dead = calls_at(&client, killed);

    // Back: within the re-probe backoff (at most 200 ms here) it is ready,
    // and it gets calls.
    proxies[0].set_upstream(r.servers[0].addr);

    let back = until(
        Duration::from_secs(5),
        "the restarted server gets calls",
        || calls_at(&client, killed) > calls_when_dead + 10,
    )
    .await;
    let (calls, errors, first) = plain.finish().await;
    assert!(
        errors <= 4,
        "{errors} of {calls} plain calls failed; at most the 4 in flight may: {first:?}"
    );
    let (calls, errors, first) = idempotent.finish().await;
    assert_eq!(
        errors, 0,
        "{errors} of {calls} idempotent calls failed: {first:?}"
    );
    eprintln!("the restarted server had calls again {back:?} after it came back");
    assert!(back < Duration::from_secs(2), "{back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_is_left_within_the_heartbeat_timeout() {
    let r = replicas(&[0, 0, 0]).await;
    let frozen = FaultProxy::start(r.servers[0].addr).await;
    let addrs = [frozen.addr, r.servers[1].addr, r.servers[2].addr];
    let client = connected(builder(&r.certs), addrs).await;
    let load = Load::start(&client, 8, true);
    load.until_more(300).await;
    frozen.freeze(true);
    let left = until(Duration::from_secs(5), "the frozen server left", || {
        client
            .endpoints()
            .iter()
            .any(|e| e.addr == frozen.addr && e.state != ConnState::Ready)
    })
    .await;
    let after = calls_at(&client, frozen.addr);
    load.until_more(1000).await;
    let (calls, errors, first) = load.finish().await;
    assert_eq!(errors, 0, "{errors} of {calls} failed: {first:?}");
    // Heartbeat timeout 500 ms, plus slack for a loaded 2-core machine.
    assert!(left < Duration::from_millis(1500), "left after {left:?}");
    assert_eq!(
        calls_at(&client, frozen.addr),
        after,
        "calls went to the frozen server"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_one_of_three_servers_costs_no_call() {
    drain_one_of_three(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_with_health_checks_costs_no_call_and_no_wait() {
    // The client's long-lived health Watch must not hold the drain.
    drain_one_of_three(true).await;
}

async fn drain_one_of_three(health_checks: bool) {
    let mut r = replicas(&[0, 0, 0]).await;
    let builder = match health_checks {
        true => builder(&r.certs).health_check(""),
        false => builder(&r.certs),
    };
    let client = connected(builder, r.servers.iter().map(|s| s.addr)).await;
    let load = Load::start(&client, 8, false);
    load.until_more(300).await;
    let drained = r.servers.remove(0);
    let drained_addr = drained.addr;
    let started = std::time::Instant::now();
    drained.shutdown(Duration::from_secs(5)).await.unwrap();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "the drain took {took:?}");
    load.until_more(1000).await;
    let (calls, errors, first) = load.finish().await;
    assert_eq!(errors, 0, "{errors} of {calls} failed: {first:?}");
    // Each call ran exactly once: none lost, none run twice.
    let runs: u64 = r.nodes.iter().map(|n| n.runs.load(Ordering::Relaxed)).sum();
    assert_eq!(runs, calls);
    let status = client
        .endpoints()
        .into_iter()
        .find(|e| e.addr == drained_addr)
        .unwrap();
    assert_ne!(status.state, ConnState::Ready, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_adds_servers_and_drains_removed_ones() {
    let r = replicas(&[0, 0, 0]).await;
    let (changes, source) = discovery::channel();
    let client = builder(&r.certs).discover(source).unwrap();
    for server in &r.servers[..2] {
        changes
            .send(discovery::Change::insert(server.addr, "localhost"))
            .unwrap();
    }
    let load = Load::start(&client, 4, false);
    load.until_more(300).await;
    // Added: it gets calls.
    let third = r.servers[2].addr;
    changes
        .send(discovery::Change::insert(third, "localhost"))
        .unwrap();
    until(
        Duration::from_secs(5),
        "the added server gets calls",
        || calls_at(&client, third) > 10,
    )
    .await;

    // Removed while a slow call runs there: that call completes, and no
    // new call goes there.
    let first = r.servers[0].addr;
    let replica = ReplicaClient::new(client.clone());
    let holds: Vec<_> = (0..6)
        .map(|_| {
            let replica = replica.clone();
            tokio::spawn(async move { replica.hold(300).await })
        })
        .collect();
    until(
        Duration::from_secs(5),
        "a slow call on the first server",
        || {
            client
                .endpoints()
                .iter()
                .any(|e| e.addr == first && e.in_flight > 0)
        },
    )
    .await;
    changes.send(discovery::Change::Remove(first)).unwrap();
    until(
        Duration::from_secs(5),
        "the removed server left the set",
        || client.endpoints().iter().all(|e| e.addr != first),
    )
    .await;
    for hold in holds {
        assert_eq!(
            hold.await.unwrap().unwrap(),
            300,
            "a call on the removed server failed"
        );
    }
    load.until_more(500).await;
    let (calls, errors, first_error) = load.finish().await;
    assert_eq!(errors, 0, "{errors} of {calls} failed: {first_error:?}");
    assert_eq!(
        r.nodes[0].runs.load(Ordering::Relaxed)
            + r.nodes[1].runs.load(Ordering::Relaxed)
            + r.nodes[2].runs.load(Ordering::Relaxed),
        calls,
        "every call ran once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_stop_at_the_budget_when_every_server_fails() {
    let r = replicas(&[0, 0, 0]).await;
    let addrs = list(r.servers.iter().map(|s| s.addr));
    // 3 attempts a call; budget: 10 % of calls over 1 s, plus 1 a second.
    let client = builder(&r.certs)
        .retries(3, Duration::from_secs(1), 1, 0.1)
        .connect(&addrs)
        .await
        .unwrap();
    let replica = ReplicaClient::new(client.clone());
    for _ in 0..50 {
        let err = replica.broken().await.unwrap_err();
        assert_eq!(err.code(), Some(rpc_core::StatusCode::Unavailable), "{err}");
    }
    let runs: u64 = r.nodes.iter().map(|n| n.runs.load(Ordering::Relaxed)).sum();
    let retries = runs - 50;
    eprintln!("50 calls, every server failing: {retries} retries (100 without a budget)");
    // 10 % of 50, plus the reserve of 1: a few more as the window slides.
    assert!((1..=10).contains(&retries), "{retries} retries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_server_is_ejected_and_idempotent_calls_go_elsewhere() {
    let r = replicas(&[0, 0, 0]).await;
    // Round robin, so the failing server is offered every third call
    // (Peak-EWMA would offer it fewer, by its latency).
    let client = connected(
        builder(&r.certs).balance(Balance::RoundRobin),
        r.servers.iter().map(|s| s.addr),
    )
    .await;
    r.nodes[0].failing.store(true, Ordering::Relaxed);
    let replica = ReplicaClient::new(client.clone());
    for n in 0..300 {
        assert_eq!(replica.echo(n).await.unwrap(), n, "retried elsewhere");
    }
    let failing = r.servers[0].addr;
    let status = client
        .endpoints()
        .into_iter()
        .find(|e| e.addr == failing)
        .unwrap();
    assert!(status.ejected, "{status:?}");
    // Five failures in a row eject it; nothing went there after.
    let runs = r.nodes[0].runs.load(Ordering::Relaxed);
    assert_eq!(runs, 5, "calls run on the failing server");
    // At most one of three may be ejected: the others serve on.
    assert!(client
        .endpoints()
        .iter()
        .filter(|e| e.addr != failing)
        .all(|e| !e.ejected));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_server_ejected_calls_still_go_to_them() {
    let r = replicas(&[0, 0]).await;
    // Any share may be ejected here, so both can be.
    let client = connected(
        builder(&r.certs).outlier_ejection(
            2,
            Duration::from_secs(60),
            Duration::from_secs(60),
            100,
        ),
        r.servers.iter().map(|s| s.addr),
    )
    .await;
    for node in &r.nodes {
        node.failing.store(true, Ordering::Relaxed);
    }
    let replica = ReplicaClient::new(client.clone());
    for _ in 0..20 {
        let err = replica.tally(1).await.unwrap_err();
        assert_eq!(err.code(), Some(rpc_core::StatusCode::Unavailable), "{err}");
    }
    assert!(
        client.endpoints().iter().all(|e| e.ejected),
        "{:?}",
        client.endpoints()
    );
    // Both ejected for a minute, yet calls reach them (panic mode): once
    // they recover, calls succeed at once.
    for node in &r.nodes {
        node.failing.store(false, Ordering::Relaxed);
    }
    assert_eq!(replica.tally(7).await.unwrap(), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_health_checks_a_server_set_not_serving_gets_no_calls() {
    let r = replicas(&[0, 0]).await;
    let client = connected(
        builder(&r.certs).health_check(""),
        r.servers.iter().map(|s| s.addr),
    )
    .await;
    let (a, b) = (r.servers[0].addr, r.servers[1].addr);
    let serving = |addr| {
        client
            .endpoints()
            .iter()
            .any(|e| e.addr == addr && e.serving)
    };
    until(Duration::from_secs(5), "both serving", || {
        serving(a) && serving(b)
    })
    .await;
    r.health[0].set("", HealthStatus::NotServing);
    until(Duration::from_secs(5), "the first not serving", || {
        !serving(a)
    })
    .await;
    let load = Load::start(&client, 4, false);
    load.until_more(300).await;
    let (calls, errors, first) = load.finish().await;
    assert_eq!(errors, 0, "{errors} of {calls} failed: {first:?}");
    assert_eq!(
        r.nodes[0].runs.load(Ordering::Relaxed),
        0,
        "calls went to a server not serving"
    );
    // Serving again: it gets calls again.
    r.health[0].set("", HealthStatus::Serving);
    until(Duration::from_secs(5), "the first serving again", || {
        serving(a)
    })
    .await;
    let load = Load::start(&client, 4, false);
    load.until_more(300).await;
    load.finish().await;
    assert!(r.nodes[0].runs.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_given_up_by_their_callers_leave_no_load_behind() {
    let r = replicas(&[0, 0]).await;
    let client = connected(builder(&r.certs), r.servers.iter().map(|s| s.addr)).await;
    let replica = ReplicaClient::new(client.clone());
    for _ in 0..10 {
        let gave_up = tokio::time::timeout(Duration::from_millis(20), replica.hold(5_000)).await;
        assert!(gave_up.is_err());
    }
    // Each dropped call stopped counting in flight, or the picker would
    // see those servers as loaded for good.
    let in_flight: Vec<u32> = client.endpoints().iter().map(|e| e.in_flight).collect();
    assert_eq!(in_flight, vec![0, 0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolves_to_its_addresses() {
    let r = replicas(&[0]).await;
    let port = r.servers[0].addr.port();
    let client = builder(&r.certs)
        .connect(&format!("localhost:{port}"))
        .await
        .unwrap();
    let endpoints = client.endpoints();
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
    assert_eq!(endpoints[0].addr, r.servers[0].addr);
    let err = builder(&r.certs)
        .connect(&format!("localhost:{port},nonsense"))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Resolve { .. }), "{err}");
}
