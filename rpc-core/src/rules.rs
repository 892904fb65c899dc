//! The protocol's rules, without I/O: which frame is legal in which
//! stage, and what a frame that breaks a rule is answered with. The driver
//! asks here and acts on the answer; every rule is unit-tested below
//! without a socket, as the heartbeat's are in `heartbeat.rs`.
//!
//! | frame | legal when | otherwise |
//! |---|---|---|
//! | `Hello` | first frame only (`transport.rs`) | `GoAway`, close |
//! | `Request` | to a server; metadata within bounds; id not running | `GoAway`, close |
//! | `Request` while draining (health checks aside) / over `max_in_flight` | | `ShuttingDown` / `Overloaded` reply |
//! | `Response` | for a call this side made | `GoAway`, close (late ones are dropped) |
//! | `Cancel` | for a request the peer made | `GoAway`, close (late ones are dropped) |
//! | `Ping` | no more often than the `Hello` allows (`heartbeat.rs`) | `GoAway`, close |
//! | a partial frame | completed within `partial_frame_timeout` | `GoAway`, close |
//! | `Open` | as `Request` | as `Request` |
//!
//! Not here: the heartbeat's own rules (`heartbeat.rs`), the stream frames'
//! (`Data`, `Credit`, `End`, `Reset`: `streams/mod.rs`, which holds the
//! state they are judged against), acting on a verdict (`driver.rs`).

use std::time::Duration;

use tokio::time::Instant;

use crate::calls::Side;
use crate::error::{Status, StatusCode};
use crate::health::is_health_method;
use crate::lifecycle::Stage;
use crate::metadata::Metadata;

/// What to do with a `Request`.
#[derive(Debug, PartialEq)]
pub(crate) enum RequestVerdict {
    /// Run it.
    Serve,
    /// Answer it with this status without running it.
    Refuse(Status),
    /// The peer broke the protocol: tell it why, and close.
    Violation(String),
}

/// What the rules remember of a connection's frames.
#[derive(Debug)]
pub(crate) struct Rules {
    side: Side,
    max_in_flight: usize,
    /// The highest request id seen: a `Cancel` above it was never requested.
    last_request_id: Option<u64>,
}

impl Rules {
    pub(crate) fn new(side: Side, max_in_flight: usize) -> Self {
        Rules {
            side,
            max_in_flight,
            last_request_id: None,
        }
    }

    /// A `Request` with `id` arrived while the connection is at `stage`
    /// and serves `running` calls as tasks; `is_running(id)` says whether
    /// `id` is one of them (asked only when some are).
    pub(crate) fn request(
        &mut self,
        stage: Stage,
        id: u64,
        method: &str,
        metadata: &Metadata,
        running: usize,
        is_running: impl FnOnce(u64) -> bool,
    ) -> RequestVerdict {
        if self.side == Side::Client {
            return RequestVerdict::Violation(
                "protocol violation: Request sent to a peer that serves no calls".into(),
            );
        }
        if !metadata.is_empty() {
            if let Err(reason) = metadata.check() {
                return RequestVerdict::Violation(format!("protocol violation: {reason}"));
            }
        }
        // Ids need not arrive in order (concurrent calls race to the
        // queue); the highest one tells a late Cancel from one never
        // requested.
        self.last_request_id = Some(self.last_request_id.map_or(id, |last| last.max(id)));
        if running > 0 && is_running(id) {
            return RequestVerdict::Violation(format!(
                "protocol violation: request id {id} is already in flight"
            ));
        }
        // A draining server still answers health checks (NOT_SERVING), so
        // a client on this connection learns why it should go elsewhere.
        if stage.ending() || (stage.draining() && !is_health_method(method)) {
            return RequestVerdict::Refuse(Status::new(
                StatusCode::ShuttingDown,
                "server is shutting down",
            ));
        }
        if running >= self.max_in_flight {
            return RequestVerdict::Refuse(Status::new(
                StatusCode::Overloaded,
                format!(
                    "more than {} calls in flight on this connection",
                    self.max_in_flight
                ),
            ));
        }
        RequestVerdict::Serve
    }

    /// A `Response` for `id` found no waiting call; `next_id` is the id
    /// this side's next call gets. `Ok` for a late reply (the caller gave
    /// up), `Err` for a call never made.
    pub(crate) fn unmatched_response(&self, id: u64, next_id: u64) -> Result<(), String> {
        if id >= next_id {
            return Err(format!(
                "protocol violation: Response for call {id}, which was never made"
            ));
        }
        Ok(())
    }

    /// A `Cancel` for `id` found no running call: `Ok` when the call
    /// finished as the `Cancel` crossed it, `Err` when it was never
    /// requested.
    pub(crate) fn unmatched_cancel(&self, id: u64) -> Result<(), String> {
        if self.last_request_id.is_none_or(|last| id > last) {
            return Err(format!(
                "protocol violation: Cancel for call {id}, which was never requested"
            ));
        }
        Ok(())
    }

    /// A `Hello` after the first frame.
    pub(crate) fn second_hello(&self) -> String {
        "protocol violation: second Hello on one connection".into()
    }
}

/// The partial-frame deadline: fails when the *same* frame has been
/// incomplete for `timeout`. A busy connection has a partial frame at most
/// ticks, but a different one each time (frames completed in between).
pub(crate) struct PartialFrameWatch {
    pub(crate) timeout: Duration,
    /// When a partial frame was first seen, and the frame count then.
    pub(crate) since: Option<(Instant, u64)>,
}

impl PartialFrameWatch {
    /// `mid`: bytes of an unfinished frame are waiting; `frames`: frames
    /// decoded so far. Returns the deadline as the error when it passed.
    pub(crate) fn check(&mut self, now: Instant, mid: bool, frames: u64) -> Result<(), Duration> {
        match self.since {
            _ if !mid => self.since = None,
            Some((_, count)) if count != frames => self.since = Some((now, frames)),
            Some((since, _)) if now.saturating_duration_since(since) >= self.timeout => {
                return Err(self.timeout);
            }
            Some(_) => {}
            None => self.since = Some((now, frames)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::Lifecycle;

    const S: Duration = Duration::from_secs(1);

    fn open() -> Stage {
        Lifecycle::Open.stage(false)
    }

    fn never(_: u64) -> bool {
        panic!("asked whether an id runs while none does")
    }

    #[test]
    fn a_client_serves_no_calls() {
        let mut rules = Rules::new(Side::Client, 10);
        let verdict = rules.request(open(), 1, "m", &Metadata::new(), 0, never);
        assert!(matches!(verdict, RequestVerdict::Violation(r) if r.contains("serves no calls")));
    }

    #[test]
    fn requests_are_served_refused_or_violations() {
        let mut rules = Rules::new(Side::Server, 2);
        assert_eq!(
            rules.request(open(), 1, "m", &Metadata::new(), 0, never),
            RequestVerdict::Serve
        );
        // Id 1 still runs: the same id again breaks the protocol.
        let again = rules.request(open(), 1, "m", &Metadata::new(), 1, |id| id == 1);
        assert!(matches!(again, RequestVerdict::Violation(r) if r.contains("already in flight")));
        assert_eq!(
            rules.request(open(), 2, "m", &Metadata::new(), 1, |id| id == 1),
            RequestVerdict::Serve
        );
        let full = rules.request(open(), 3, "m", &Metadata::new(), 2, |_| false);
        assert!(matches!(full, RequestVerdict::Refuse(s) if s.code == StatusCode::Overloaded));
        let mut draining = Lifecycle::Open;
        draining.drain();
        let late = rules.request(draining.stage(false), 4, "m", &Metadata::new(), 0, never);
        assert!(matches!(late, RequestVerdict::Refuse(s) if s.code == StatusCode::ShuttingDown));
        // Health checks are still answered while draining, not once closing.
        let health = crate::health::CHECK_METHOD;
        let check = rules.request(draining.stage(false), 5, health, &Metadata::new(), 0, never);
        assert_eq!(check, RequestVerdict::Serve);
        let mut closing = Lifecycle::Open;
        closing.close(crate::lifecycle::CloseCause::ClosedHere);
        let check = rules.request(closing.stage(false), 6, health, &Metadata::new(), 0, never);
        assert!(matches!(check, RequestVerdict::Refuse(s) if s.code == StatusCode::ShuttingDown));
    }

    #[test]
    fn metadata_over_its_bounds_is_a_violation_naming_the_bound() {
        let mut rules = Rules::new(Side::Server, 10);
        let entries = (0..=crate::metadata::MAX_ENTRIES)
            .map(|i| (format!("k{i}"), bytes::Bytes::new()))
            .collect();
        let verdict = rules.request(open(), 1, "m", &Metadata::from_wire(entries), 0, never);
        let RequestVerdict::Violation(reason) = verdict else {
            panic!("{verdict:?}")
        };
        assert!(reason.contains("limit is 32"), "{reason}");
        let big = vec![("k".to_owned(), bytes::Bytes::from(vec![0u8; 9000]))];
        let verdict = rules.request(open(), 2, "m", &Metadata::from_wire(big), 0, never);
        assert!(matches!(verdict, RequestVerdict::Violation(r) if r.contains("limit is 8192")));
    }

    #[test]
    fn late_replies_and_cancels_pass_and_unknown_ones_do_not() {
        let mut rules = Rules::new(Side::Server, 10);
        assert!(rules.unmatched_cancel(1).is_err(), "nothing requested yet");
        // A refused request counts as requested: its Cancel may cross the refusal.
        let mut draining = Lifecycle::Open;
        draining.drain();
        let _ = rules.request(draining.stage(false), 5, "m", &Metadata::new(), 0, never);
        assert!(rules.unmatched_cancel(5).is_ok());
        assert!(rules.unmatched_cancel(3).is_ok());
        assert!(rules
            .unmatched_cancel(6)
            .unwrap_err()
            .contains("never requested"));
        assert!(rules.unmatched_response(4, 5).is_ok());
        assert!(rules
            .unmatched_response(5, 5)
            .unwrap_err()
            .contains("never made"));
        assert!(rules.second_hello().contains("second Hello"));
    }

    #[test]
    fn the_same_partial_frame_for_the_timeout_fails() {
        let t0 = Instant::now();
        let mut w = PartialFrameWatch {
            timeout: 30 * S,
            since: None,
        };
        assert_eq!(w.check(t0, true, 7), Ok(()));
        assert_eq!(w.check(t0 + 29 * S, true, 7), Ok(()));
        assert_eq!(w.check(t0 + 30 * S, true, 7), Err(30 * S));
    }

    #[test]
    fn a_new_partial_frame_every_tick_never_fails() {
        let t0 = Instant::now();
        let mut w = PartialFrameWatch {
            timeout: 2 * S,
            since: None,
        };
        for tick in 0..100u32 {
            assert_eq!(
                w.check(t0 + tick * S, true, u64::from(tick)),
                Ok(()),
                "tick {tick}"
            );
        }
    }

    #[test]
    fn no_partial_frame_resets_the_watch() {
        let t0 = Instant::now();
        let mut w = PartialFrameWatch {
            timeout: 2 * S,
            since: None,
        };
        assert_eq!(w.check(t0, true, 1), Ok(()));
        assert_eq!(w.check(t0 + S, false, 1), Ok(()));
        assert_eq!(w.check(t0 + 2 * S, true, 1), Ok(()));
        assert_eq!(w.check(t0 + 3 * S, true, 1), Ok(()));
        assert_eq!(w.check(t0 + 4 * S, true, 1), Err(2 * S));
    }
}
