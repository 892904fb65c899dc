//! The `rpc-client` binary against an in-process demo server on 127.0.0.1:
//! results on stdout one per line, errors on stderr with a non-zero exit.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use rpc_server::{demo, devcerts, Server};

struct Fixture {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    addr: String,
}

async fn start_server() -> Fixture {
    start_servers(1).await
}

/// `n` demo servers with one certificate; `addr` lists them all
/// (`a,b,c`).
async fn start_servers(n: usize) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    devcerts::write_to(dir.path()).unwrap();
    let p = |n: &str| dir.path().join(n);
    let mut addrs = vec![];
    for _ in 0..n {
        let tls = rpc_core::tls::server_config(&p("server.pem"), &p("server.key"), None).unwrap();
        let server = Server::builder(tls).router(demo::router()).build().unwrap();
        let listener = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        addrs.push(listener.local_addr().unwrap().to_string());
        tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    }
    Fixture {
        ca: p("ca.pem"),
        _dir: dir,
        addr: addrs.join(","),
    }
}

async fn run(ca: &Path, addr: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rpc-client"));
    cmd.arg("--connect")
        .arg(addr)
        .arg("--ca")
        .arg(ca)
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_print_results_one_per_line() {
    let f = start_server().await;
    let out = run(&f.ca, &f.addr, &["call", "echo", "hello world"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "hello world\n");
    let out = run(&f.ca, &f.addr, &["call", "add", "2", "3"]).await;
    assert_eq!(stdout(&out), "5\n");
    let out = run(&f.ca, &f.addr, &["call", "add", "-10", "3"]).await;
    assert_eq!(stdout(&out), "-7\n", "{}", stderr(&out));
    let out = run(&f.ca, &f.addr, &["call", "sleep", "10"]).await;
    assert_eq!(stdout(&out), "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_arguments_are_clear_errors_not_panics() {
    let f = start_server().await;
    for args in [&["call", "add", "two", "3"][..], &["call", "add", "1"][..]] {
        let out = run(&f.ca, &f.addr, args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stdout(&out).is_empty());
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
        assert!(stderr(&out).contains("error"), "{}", stderr(&out));
    }
    let out = run(&f.ca, &f.addr, &["call", "add", "9223372036854775807", "1"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("overflows"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_fails_a_slow_call_with_a_deadline_error() {
    let f = start_server().await;
    let started = Instant::now();
    let out = run(
        &f.ca,
        &f.addr,
        &["--timeout", "300ms", "call", "sleep", "5000"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("deadline"), "{}", stderr(&out));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_ca_and_missing_ca_are_reported() {
    let f = start_server().await;
    let other = tempfile::tempdir().unwrap();
    devcerts::write_to(other.path()).unwrap();
    let out = run(
        &other.path().join("ca.pem"),
        &f.addr,
        &["call", "echo", "x"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));
    let missing = other.path().join("nope.pem");
    let out = run(&missing, &f.addr, &["call", "echo", "x"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("nope.pem"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_json_reports_calls_rate_latency_and_errors() {
    let f = start_server().await;
    let out = run(
        &f.ca,
        &f.addr,
        &[
            "bench",
            "--concurrency",
            "8",
            "--duration",
            "500ms",
            "--payload",
            "32",
            "--json",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    let calls = report["calls"].as_u64().unwrap();
    assert!(calls > 0, "{report}");
    assert_eq!(report["errors"].as_u64(), Some(0), "{report}");
    let seconds = report["seconds"].as_f64().unwrap();
    assert!(seconds >= 0.5, "{report}");
    let rate = report["calls_per_sec"].as_f64().unwrap();
    assert!((rate - calls as f64 / seconds).abs() < 1.0, "{report}");
    let (p50, p99) = (
        report["p50_us"].as_u64().unwrap(),
        report["p99_us"].as_u64().unwrap(),
    );
    assert!(p50 > 0 && p50 <= p99, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_over_three_servers_reports_the_calls_each_answered() {
    let f = start_servers(3).await;
    let args = [
        "bench",
        "--concurrency",
        "8",
        "--duration",
        "500ms",
        "--json",
    ];
    let out = run(&f.ca, &f.addr, &args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(report["errors"].as_u64(), Some(0), "{report}");
    let endpoints = report["endpoints"].as_object().unwrap();
    let mut listed: Vec<&str> = endpoints.keys().map(String::as_str).collect();
    listed.sort();
    let mut given: Vec<&str> = f.addr.split(',').collect();
    given.sort();
    assert_eq!(listed, given, "{report}");
    let each: Vec<u64> = endpoints.values().map(|v| v.as_u64().unwrap()).collect();
    assert!(
        each.iter().all(|n| *n > 0),
        "a server got no call: {report}"
    );
    assert_eq!(
        each.iter().sum::<u64>(),
        report["calls"].as_u64().unwrap(),
        "{report}"
    );
    // The text report lists them too.
    let out = run(&f.ca, &f.addr, &["bench", "--duration", "200ms"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = stdout(&out)
        .lines()
        .filter(|l| l.starts_with("endpoint "))
        .count();
    assert_eq!(lines, 3, "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_prints_one_rtt_per_round_trip() {
    let f = start_server().await;
    let out = run(
        &f.ca,
        &f.addr,
        &[
            "--heartbeat-interval",
            "100ms",
            "--heartbeat-timeout",
            "1s",
            "ping",
            "--count",
            "3",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    for line in lines {
        let ms = line
            .strip_prefix("rtt ")
            .and_then(|l| l.strip_suffix("ms"))
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        let ms: f64 = ms.parse().unwrap();
        assert!(ms > 0.0 && ms < 1000.0, "{line}");
    }
}

/// With the default 5 s heartbeat, three pings go back to back: the whole
/// command (process start, TLS, three round trips) takes well under the
/// one interval that pacing would have cost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_count_3_sends_its_pings_back_to_back() {
    let f = start_server().await;
    let started = std::time::Instant::now();
    let out = run(&f.ca, &f.addr, &["ping", "--count", "3"]).await;
    let took = started.elapsed();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count(), 3);
    assert!(
        took < Duration::from_secs(3),
        "ping --count 3 took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_keeps_going_when_the_server_restarts() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    let dir = tempfile::tempdir().unwrap();
    devcerts::write_to(dir.path()).unwrap();
    let p = |n: &str| dir.path().join(n);
    let tls = rpc_core::tls::server_config(&p("server.pem"), &p("server.key"), None).unwrap();
    // The second server counts the calls it serves.
    let served = Arc::new(AtomicU64::new(0));
    let counting = {
        let served = served.clone();
        rpc_server::Router::new().route("Demo.echo", move |s: String| {
            served.fetch_add(1, Ordering::Relaxed);
            async move { Ok(s) }
        })
    };
    let first = Server::builder(tls.clone())
        .router(demo::router())
        .build()
        .unwrap();
    let listener = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let first_task = tokio::spawn(async move {
        first
            .serve(listener, async move {
                let _ = stopped.await;
            })
            .await
    });
    let bench = {
        let ca = p("ca.pem");
        let addr = addr.to_string();
        tokio::spawn(async move {
            run(
                &ca,
                &addr,
                &[
                    "--timeout",
                    "5s",
                    "bench",
                    "--concurrency",
                    "4",
                    "--duration",
                    "2s",
                    "--json",
                ],
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let _ = stop.send(());
    first_task.await.unwrap().unwrap();
    // Same address, same certificate, a new process-worth of server.
    let second = Server::builder(tls).router(counting).build().unwrap();
    let listener = Server::bind(addr).await.unwrap();
    tokio::spawn(async move { second.serve(listener, std::future::pending()).await });
    let out = bench.await.unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert!(report["calls"].as_u64().unwrap() > 0, "{report}");
    assert!(
        served.load(Ordering::Relaxed) > 0,
        "the bench did not go on against the restarted server: {report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_prints_counters_one_per_line() {
    let f = start_server().await;
    run(&f.ca, &f.addr, &["call", "add", "1", "2"]).await;
    run(&f.ca, &f.addr, &["call", "add", "9223372036854775807", "1"]).await;
    let out = run(&f.ca, &f.addr, &["stats"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let value = |key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .unwrap_or_else(|| panic!("no {key} in {text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("connections"), 1, "{text}"); // this client's
    assert_eq!(value("calls_in_flight"), 1, "{text}"); // this call
    assert!(value("calls_served") >= 1, "{text}");
    assert_eq!(value("errors.invalid_argument"), 1, "{text}");
    assert_eq!(value("errors.unknown_method"), 0, "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("rtt 127.0.0.1:")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_prints_each_method_with_its_types() {
    let f = start_server().await;
    let out = run(&f.ca, &f.addr, &["list"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for line in [
        "Demo.echo(text: String) -> String",
        "Demo.add(a: i64, b: i64) -> i64",
        "Demo.sleep(ms: u64) -> ()",
        "Demo.whoami() -> String",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in:\n{text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_prints_methods_and_call_takes_json_by_schema() {
    let f = start_server().await;
    let out = run(&f.ca, &f.addr, &["describe", "Demo"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.lines().any(|l| l == "Demo.add(a: i64, b: i64) -> i64"),
        "{text}"
    );
    assert!(!text.contains("no schema"), "{text}");
    let out = run(&f.ca, &f.addr, &["describe", "Demo.add", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let schemas: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        schemas,
        serde_json::json!({"Demo.add": {
            "args": [["a", "I64"], ["b", "I64"]],
            "reply": "I64",
            "items_in": null,
            "items_out": null,
            "registry": {}
        }})
    );
    let out = run(&f.ca, &f.addr, &["describe", "Nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no service \"Nope\" on the server; it has Demo"),
        "{}",
        stderr(&out)
    );

    for (args, reply) in [
        (&["call", "Demo.add", r#"{"a": 2, "b": 3}"#][..], "5\n"),
        (&["call", "Demo.add", "[-10, 3]"][..], "-7\n"),
        (
            &["call", "Demo.echo", r#"{"text": "hi \"there\""}"#][..],
            "\"hi \\\"there\\\"\"\n",
        ),
        (&["call", "Demo.whoami"][..], "\"anonymous\"\n"),
        (&["call", "Demo.metadata"][..], "[]\n"),
    ] {
        let out = run(&f.ca, &f.addr, args).await;
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), reply, "{args:?}");
    }

    // From a file.
    let args = f._dir.path().join("args.json");
    std::fs::write(&args, r#"{"a": 40, "b": 2}"#).unwrap();
    let at = format!("@{}", args.display());
    let out = run(&f.ca, &f.addr, &["call", "Demo.add", &at]).await;
    assert_eq!(stdout(&out), "42\n", "{}", stderr(&out));
    let out = run(
        &f.ca,
        &f.addr,
        &["call", "Demo.add", "@/nonexistent/args.json"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("reading the arguments of Demo.add"),
        "{}",
        stderr(&out)
    );

    // Refused before sending, naming the argument; bad JSON; no such method.
    for (args, said) in [
        (
            &["call", "Demo.add", r#"{"a": 2, "b": "3"}"#][..],
            "refused before sending: b: expected an integer",
        ),
        (
            &["call", "Demo.add", r#"{"a": 2}"#][..],
            "refused before sending: b: missing",
        ),
        (
            &["call", "Demo.add", "{a: 2}"][..],
            "the arguments of Demo.add are not JSON",
        ),
        (
            &["call", "Demo.nope", "[]"][..],
            "the server has no method \"Demo.nope\"",
        ),
        (&["call", "nope"][..], "no demo call \"nope\""),
    ] {
        let out = run(&f.ca, &f.addr, args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stdout(&out).is_empty(), "{args:?}");
        assert!(stderr(&out).contains(said), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meta_flags_reach_the_server_and_call_metadata_prints_them_sorted() {
    let f = start_server().await;
    let out = run(
        &f.ca,
        &f.addr,
        &[
            "--meta",
            "tenant=blue",
            "--meta",
            "request-id=a=b",
            "call",
            "metadata",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "request-id=a=b\ntenant=blue\n");
    // None sent: nothing printed.
    let out = run(&f.ca, &f.addr, &["call", "metadata"]).await;
    assert_eq!(stdout(&out), "", "{}", stderr(&out));
    // A key the library refuses is a usage error, before any connection.
    for bad in ["Tenant=x", "srpc-x=1", "novalue"] {
        let out = run(&f.ca, &f.addr, &["--meta", bad, "call", "metadata"]).await;
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", stderr(&out));
        assert!(stderr(&out).contains("--meta"), "{bad}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_prints_the_status_and_exits_0_only_when_serving() {
    let dir = tempfile::tempdir().unwrap();
    devcerts::write_to(dir.path()).unwrap();
    let p = |n: &str| dir.path().join(n);
    let tls = rpc_core::tls::server_config(&p("server.pem"), &p("server.key"), None).unwrap();
    let server = Server::builder(tls).router(demo::router()).build().unwrap();
    let health = server.health();
    let listener = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    let ca = p("ca.pem");

    for service in [&[][..], &["Demo"][..]] {
        let args: Vec<&str> = ["health"].iter().chain(service).copied().collect();
        let out = run(&ca, &addr, &args).await;
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert_eq!(stdout(&out), "SERVING\n");
    }
    health.set("Demo", rpc_server::HealthStatus::NotServing);
    let out = run(&ca, &addr, &["health", "Demo"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert_eq!(stdout(&out), "NOT_SERVING\n");
    // An unknown service is an error naming it, also exit 1.
    let out = run(&ca, &addr, &["health", "Nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("no service \"Nope\""),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_missing_ca_is_a_usage_error_with_exit_2() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rpc-client"))
        .args(["call", "echo", "x"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca is required"), "{err}");
}
