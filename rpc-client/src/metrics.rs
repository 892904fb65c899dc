//! The client's call metrics, with OpenTelemetry's names (semantic
//! conventions v1.40.0, RPC), through the `metrics` facade: on when the
//! client is built with `ClientBuilder::metrics(true)`.
//!
//! | metric | kind | attributes |
//! |---|---|---|
//! | `rpc.client.call.duration` (s) | histogram | `rpc.system.name`, `rpc.service`, `rpc.method`, `rpc.response.status_code` |
//! | `rpc.client.active_calls` | gauge, sampled each second | `rpc.system.name` |
//! | `srpc.client.connections` | gauge (servers with a ready connection), sampled each second | |
//! | `srpc.client.connection.rtt` (s) | histogram of each connection's heartbeat round trip, sampled each second | |
//! | `srpc.client.received_bytes`, `srpc.client.sent_bytes` | counters (socket bytes, TLS included), sampled each second | |
//!
//! A call is recorded once, however many attempts it took, from the
//! caller's start to its result; `rpc.response.status_code` is the
//! server's status, or the client's verdict for a call that got none
//! (`DEADLINE_EXCEEDED`, `UNAVAILABLE`, `INTERNAL` for a reply that did not
//! decode).
//!
//! Not here: the server's side (rpc-server's `metrics.rs`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::Histogram;
use rpc_core::{Connection, StatusCode};

use crate::pool::Pool;
use crate::ClientError;

/// The call duration histogram's name.
pub const CLIENT_CALL_DURATION: &str = "rpc.client.call.duration";
/// The calls-in-flight gauge's name.
pub const CLIENT_ACTIVE_CALLS: &str = "rpc.client.active_calls";
/// The ready-connections gauge's name.
pub const CLIENT_CONNECTIONS: &str = "srpc.client.connections";
/// The heartbeat round-trip histogram's name.
pub const CLIENT_CONNECTION_RTT: &str = "srpc.client.connection.rtt";
/// The received bytes counter's name.
pub const CLIENT_RECEIVED_BYTES: &str = "srpc.client.received_bytes";
/// The sent bytes counter's name.
pub const CLIENT_SENT_BYTES: &str = "srpc.client.sent_bytes";
/// How often the gauges, round trips and bytes are sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Samples the pool's gauges, round trips and bytes every
/// [`SAMPLE_EVERY`] until the client is closed (its last clone dropped).
pub(crate) fn sample(pool: Arc<Pool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut bytes = Bytes::default();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = pool.closed.cancelled() => break,
            }
            let endpoints = pool.connections();
            let in_flight: u64 = endpoints.iter().map(|(_, n, _)| u64::from(*n)).sum();
            metrics::gauge!(CLIENT_ACTIVE_CALLS, "rpc.system.name" => "srpc").set(in_flight as f64);
            metrics::gauge!(CLIENT_CONNECTIONS).set(pool.ready_count() as f64);
            let rtt = metrics::histogram!(CLIENT_CONNECTION_RTT);
            for d in endpoints.iter().filter_map(|(_, _, c)| c.as_ref()?.rtt()) {
                rtt.record(d.as_secs_f64());
            }
            record_bytes(bytes.take(&endpoints));
        }
        // What moved since the last tick.
        record_bytes(bytes.take(&[]));
    });
}

/// Bytes already reported, per server: its connection then and its
/// counts, so a connection replaced between two ticks still reports its
/// last bytes.
#[derive(Default)]
struct Bytes {
    seen: HashMap<SocketAddr, (Connection, (u64, u64))>,
}

fn record_bytes((received, sent): (u64, u64)) {
    metrics::counter!(CLIENT_RECEIVED_BYTES).increment(received);
    metrics::counter!(CLIENT_SENT_BYTES).increment(sent);
}

impl Bytes {
    /// Bytes (received, sent) moved since the last call, on `endpoints`'
    /// connections and on those they had before.
    fn take(&mut self, endpoints: &[(SocketAddr, u32, Option<Connection>)]) -> (u64, u64) {
        let (mut received, mut sent) = (0, 0);
        let mut add = |now: (u64, u64), before: (u64, u64)| {
            received += now.0.saturating_sub(before.0);
            sent += now.1.saturating_sub(before.1);
        };
        let mut seen = HashMap::with_capacity(endpoints.len());
        for (addr, _, conn) in endpoints {
            let Some(conn) = conn else { continue };
            let mut before = (0, 0);
            if let Some((old, counted)) = self.seen.remove(addr) {
                if old.same(conn) {
                    before = counted;
                } else {
                    add(old.bytes(), counted);
                }
            }
            let now = conn.bytes();
            add(now, before);
            seen.insert(*addr, (conn.clone(), now));
        }
        // Servers gone, or without a connection now: their last bytes.
        for (old, counted) in self.seen.values() {
            add(old.bytes(), *counted);
        }
        self.seen = seen;
        (received, sent)
    }
}

/// Histograms by method, one per outcome, each made at first use.
#[derive(Default)]
pub(crate) struct CallMetrics {
    rows: Mutex<HashMap<String, Arc<Row>>>,
}

/// One method's histograms: `[0]` OK, `[1 + code.index()]` a failure with
/// that code, the last `UNAVAILABLE` for a call that got no status.
struct Row {
    method: String,
    by_outcome: [OnceLock<Histogram>; 2 + StatusCode::ALL.len()],
}

impl CallMetrics {
    /// Records one call to `method` that took `elapsed` and ended with
    /// `result`.
    pub(crate) fn record<T>(
        &self,
        method: &str,
        elapsed: Duration,
        result: &Result<T, ClientError>,
    ) {
        let row = {
            let mut rows = self.rows.lock().unwrap_or_else(|e| e.into_inner());
            match rows.get(method) {
                Some(row) => row.clone(),
                None => {
                    let row = Arc::new(Row {
                        method: method.to_owned(),
                        by_outcome: std::array::from_fn(|_| OnceLock::new()),
                    });
                    rows.insert(method.to_owned(), row.clone());
                    row
                }
            }
        };
        let outcome = match result {
            Ok(_) => Ok(()),
            Err(e) => Err(code_of(e)),
        };
        let slot = match outcome {
            Ok(()) => 0,
            Err(Some(code)) => 1 + code.index(),
            Err(None) => 1 + StatusCode::ALL.len(),
        };
        let histogram = row.by_outcome[slot].get_or_init(|| {
            let (service, _) = row.method.split_once('.').unwrap_or(("", &row.method));
            let status = match outcome {
                Ok(()) => "OK".to_owned(),
                Err(Some(code)) => code.name().to_uppercase(),
                Err(None) => "UNAVAILABLE".to_owned(),
            };
            metrics::histogram!(
                CLIENT_CALL_DURATION,
                "rpc.system.name" => "srpc",
                "rpc.service" => service.to_owned(),
                "rpc.method" => row.method.clone(),
                "rpc.response.status_code" => status,
            )
        });
        histogram.record(elapsed.as_secs_f64());
    }
}

/// The status code a failed call is recorded with; `None` for one that
/// got none (no server, connection lost).
fn code_of(error: &ClientError) -> Option<StatusCode> {
    match error {
        ClientError::Call(e) => e.code(),
        ClientError::Decode { .. } | ClientError::Encode { .. } => Some(StatusCode::Internal),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes as Body;
    use rpc_core::{BoxFuture, CallContext, Connection, ConnectionConfig, Dispatch, Status};

    use super::Bytes;

    struct Echo;

    impl Dispatch for Echo {
        fn dispatch(&self, _: CallContext, body: Body) -> BoxFuture<Result<Body, Status>> {
            Box::pin(async move { Ok(body) })
        }
    }

    /// A client connection to an echo server over a pipe.
    fn connection() -> Connection {
        let config = ConnectionConfig::default();
        let hello = rpc_core::transport::hello_for(&config);
        let addr = "127.0.0.1:7".parse().unwrap();
        let (a, b) = tokio::io::duplex(1 << 16);
        let (client, driver) = rpc_core::connection::start(a, &config, addr, hello, None);
        tokio::spawn(driver);
        let (_server, driver) =
            rpc_core::connection::start(b, &config, addr, hello, Some(Arc::new(Echo)));
        tokio::spawn(driver);
        client
    }

    async fn calls(conn: &Connection, n: usize) {
        for _ in 0..n {
            let body = Body::from_static(b"0123456789");
            conn.call("echo", body, Duration::from_secs(5))
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn a_connection_replaced_between_two_ticks_still_reports_its_last_bytes() {
        let addr = "127.0.0.1:9".parse().unwrap();
        let (first, second) = (connection(), connection());
        let mut bytes = Bytes::default();
        let add = |(a, b): (u64, u64), (c, d): (u64, u64)| (a + c, b + d);
        calls(&first, 3).await;
        let mut total = bytes.take(&[(addr, 0, Some(first.clone()))]);
        assert_eq!(total, first.bytes());
        // Between two ticks: more on the first, then the second replaces it.
        calls(&first, 3).await;
        calls(&second, 2).await;
        total = add(total, bytes.take(&[(addr, 0, Some(second.clone()))]));
        calls(&second, 2).await;
        // The server is gone from the list: its last bytes still count.
        total = add(total, bytes.take(&[]));
        assert_eq!(total, add(first.bytes(), second.bytes()));
        assert!(total.0 > 0 && total.1 > 0);
        assert_eq!(bytes.take(&[]), (0, 0));
    }
}
