//! When a call is sent again: the retry policy of a client.
//!
//! ```text
//! call fails ─► refused unrun (GoAway crossed it, ShuttingDown)? ─► again, always
//!            └► idempotent, and the outcome unknown or no server?
//!                 (connection died after sending; Unavailable)
//!                 ─► attempts left (3 in all)? budget allows? time left?
//!                      ─► wait (full jitter, 25 ms doubling, at most
//!                         250 ms) ─► again
//! ```
//!
//! Every retry of an idempotent call takes a token from one budget per
//! client (tower's `TpsBudget`: each idempotent call deposits, a retry
//! withdraws; by default 20 % of calls plus 10 a second, over 10 s), so an
//! outage does not multiply the load on the servers that are left. Calls
//! refused unrun do not count: the server asked for them to go elsewhere.
//!
//! Not here: the call loop itself (`client.rs`).

use std::time::Duration;

use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tracing::debug;

use crate::backoff::Backoff;
use crate::ClientError;

/// Attempts of an idempotent call, the first included, by default.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// What `ClientBuilder::retries` sets; the policy is made from it at
/// connect.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetrySettings {
    pub(crate) max_attempts: u32,
    pub(crate) ttl: Duration,
    pub(crate) min_per_sec: u32,
    pub(crate) percent: f32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            ttl: Duration::from_secs(10),
            min_per_sec: 10,
            percent: 0.2,
        }
    }
}

impl RetrySettings {
    pub(crate) fn policy(self) -> RetryPolicy {
        RetryPolicy::new(self.max_attempts, self.ttl, self.min_per_sec, self.percent)
    }
}

/// The retry policy and budget one client (and its clones) share.
#[derive(Debug)]
pub(crate) struct RetryPolicy {
    pub(crate) max_attempts: u32,
    budget: TpsBudget,
}

impl RetryPolicy {
    /// See `ClientBuilder::retries`.
    pub(crate) fn new(max_attempts: u32, ttl: Duration, min_per_sec: u32, percent: f32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            budget: TpsBudget::new(
                ttl.clamp(Duration::from_secs(1), Duration::from_secs(60)),
                min_per_sec,
                percent.clamp(0.0, 1000.0),
            ),
        }
    }

    /// An idempotent call starts: it earns its share of retries.
    pub(crate) fn deposit(&self) {
        self.budget.deposit();
    }

    /// Whether attempt `attempt` (from 1) of an idempotent call may be
    /// followed by another after `error`, before `deadline`; waits the
    /// backoff first when it may.
    pub(crate) async fn again(
        &self,
        attempt: &mut u32,
        error: &ClientError,
        deadline: Instant,
    ) -> bool {
        if *attempt >= self.max_attempts || !outcome_unknown(error) {
            return false;
        }
        let mut backoff = Backoff::new(Duration::from_millis(25), Duration::from_millis(250));
        for _ in 1..*attempt {
            backoff.next_wait();
        }
        let wait = backoff.next_wait();
        if Instant::now() + wait >= deadline {
            return false;
        }
        if !self.budget.withdraw() {
            debug!(error = %error, "retry budget exhausted; not retrying");
            return false;
        }
        debug!(error = %error, attempt = *attempt, ?wait, "retrying an idempotent call");
        tokio::time::sleep(wait).await;
        *attempt += 1;
        true
    }
}

/// Failures after which an idempotent call may run again: its connection
/// died (the call may or may not have run), no server was reachable, or
/// the server said `Unavailable`.
fn outcome_unknown(error: &ClientError) -> bool {
    use rpc_core::Error;
    match error {
        ClientError::Unavailable { .. } => true,
        ClientError::Call(e) => match e {
            Error::Closed { .. }
            | Error::PeerUnresponsive(_)
            | Error::WriteStalled(_)
            | Error::Io(_) => true,
            Error::Status(s) => s.code == rpc_core::StatusCode::Unavailable,
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed() -> ClientError {
        ClientError::Call(rpc_core::Error::Closed {
            reason: "peer closed the connection".into(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_stop_at_the_limit_and_the_deadline() {
        let policy = RetryPolicy::new(3, Duration::from_secs(10), 100, 0.2);
        let far = Instant::now() + Duration::from_secs(60);
        let mut attempt = 1;
        assert!(policy.again(&mut attempt, &closed(), far).await);
        assert!(policy.again(&mut attempt, &closed(), far).await);
        assert_eq!(attempt, 3);
        assert!(
            !policy.again(&mut attempt, &closed(), far).await,
            "3 in all"
        );
        let mut attempt = 1;
        let now = Instant::now();
        assert!(
            !policy.again(&mut attempt, &closed(), now).await,
            "no time left"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_unknown_outcomes_are_retried() {
        let policy = RetrySettings::default().policy();
        let far = Instant::now() + Duration::from_secs(60);
        let denied = ClientError::Call(rpc_core::Error::Status(rpc_core::Status::new(
            rpc_core::StatusCode::PermissionDenied,
            "no",
        )));
        let deadline = ClientError::Call(rpc_core::Error::DeadlineExceeded(Duration::ZERO));
        for error in [denied, deadline, ClientError::Closed] {
            assert!(!policy.again(&mut 1, &error, far).await, "{error}");
        }
        let unavailable = ClientError::Call(rpc_core::Error::Status(
            rpc_core::Status::unavailable("down"),
        ));
        assert!(policy.again(&mut 1, &unavailable, far).await);
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_bounds_retries_across_calls() {
        // 1 retry a second of reserve, 10 % of deposits on top.
        let policy = RetryPolicy::new(2, Duration::from_secs(1), 1, 0.1);
        let far = Instant::now() + Duration::from_secs(60);
        for _ in 0..20 {
            policy.deposit();
        }
        let mut retried = 0;
        for _ in 0..20 {
            if policy.again(&mut 1, &closed(), far).await {
                retried += 1;
            }
        }
        assert!((1..=3).contains(&retried), "{retried} retries for 20 calls");
    }
}
