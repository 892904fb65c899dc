//! The client's call metrics, with OpenTelemetry's names (semantic
//! conventions v1.40.0, RPC), through the `metrics` facade: on when the
//! client is built with `ClientBuilder::metrics(true)`.
//!
//! | metric | kind | attributes |
//! |---|---|---|
//! | `rpc.client.call.duration` (s) | histogram | `rpc.system.name`, `rpc.service`, `rpc.method`, `rpc.response.status_code` |
//!
//! A call is recorded once, however many attempts it took, from the
//! caller's start to its result; `rpc.response.status_code` is the
//! server's status, or the client's verdict for a call that got none
//! (`DEADLINE_EXCEEDED`, `UNAVAILABLE`, `INTERNAL` for a reply that did not
//! decode).
//!
//! Not here: the server's side (rpc-server's `metrics.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use metrics::Histogram;
use rpc_core::StatusCode;

use crate::ClientError;

/// The call duration histogram's name.
pub const CLIENT_CALL_DURATION: &str = "rpc.client.call.duration";

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
