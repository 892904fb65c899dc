//! A connection's life stage as one enum, and why it ended.
//!
//! ```text
//!   Open ──drain()──► Draining ──handlers done──┐
//!    │                   │                      ▼
//!    └──close(), peer gone, silent, broke rule─► Closing{cause} ──flushed──► Closed{cause}
//! ```
//!
//! Orthogonal to the stage: whether the *peer* sent `GoAway` (this side
//! then makes no new calls, and calls in flight still finish). Both live
//! under the connection's one lock (`shared.rs`), beside the pending calls,
//! so a call is never registered on a connection that has begun to close.
//! For lock-free reads on every call, [`Stage`] mirrors them in a byte.
//!
//! Not here: acting on a stage (the driver), or the rules of which frame is
//! legal in which stage (`rules.rs`).

use std::time::Duration;

use crate::error::Error;

/// Where a connection is in its life.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) enum Lifecycle {
    /// Calls go both ways.
    #[default]
    Open,
    /// This side sent `GoAway`: it refuses new calls from the peer with
    /// `ShuttingDown` and closes once the calls it serves are done.
    Draining,
    /// Ending: pending calls have failed (or are failing) with the cause;
    /// the last frames and TLS close_notify go out.
    Closing(CloseCause),
    /// The driver has finished.
    Closed(CloseCause),
}

/// Which side chose to end the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Initiator {
    ThisSide,
    Peer,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CloseCause {
    /// [`Connection::close`](crate::Connection::close), or the client or
    /// server that owns the connection closed it.
    ClosedHere,
    /// This side drained (sent `GoAway`, served what ran) and then closed.
    Drained,
    /// The heartbeat heard nothing for this long.
    PeerUnresponsive(Duration),
    /// The peer broke a protocol rule; it is told with `GoAway(reason)`.
    PeerBrokeProtocol(String),
    /// The peer closed the connection (the words say how).
    PeerClosed(String),
    /// Reading or writing the socket failed (the words say how).
    Io(String),
}

impl CloseCause {
    /// Which side ended the connection.
    pub(crate) fn initiator(&self) -> Initiator {
        match self {
            CloseCause::PeerClosed(_) | CloseCause::Io(_) => Initiator::Peer,
            _ => Initiator::ThisSide,
        }
    }

    /// The peer still talks and this side closes first: after its own
    /// close_notify it reads until the peer's (RFC 8446 6.1), so neither
    /// kernel answers with a TCP reset.
    pub(crate) fn awaits_peer_close(&self) -> bool {
        matches!(self, CloseCause::ClosedHere | CloseCause::Drained)
    }

    /// The `GoAway` reason to send before closing, when the peer must be
    /// told why.
    pub(crate) fn goaway_reason(&self) -> Option<&str> {
        match self {
            CloseCause::PeerBrokeProtocol(reason) => Some(reason),
            _ => None,
        }
    }

    /// What a call pending on the connection fails with.
    pub(crate) fn error(&self) -> Error {
        match self {
            CloseCause::PeerUnresponsive(d) => Error::PeerUnresponsive(*d),
            other => Error::Closed {
                reason: other.describe(),
            },
        }
    }

    /// The cause in words, for logs and [`Connection::close_reason`](crate::Connection::close_reason).
    pub(crate) fn describe(&self) -> String {
        match self {
            CloseCause::ClosedHere => "closed by this side".into(),
            CloseCause::Drained => "drained after GoAway".into(),
            CloseCause::PeerUnresponsive(_) => self.error().to_string(),
            CloseCause::PeerBrokeProtocol(reason)
            | CloseCause::PeerClosed(reason)
            | CloseCause::Io(reason) => reason.clone(),
        }
    }
}

impl Lifecycle {
    /// The cause, once ending.
    pub(crate) fn cause(&self) -> Option<&CloseCause> {
        match self {
            Lifecycle::Closing(cause) | Lifecycle::Closed(cause) => Some(cause),
            _ => None,
        }
    }

    /// `drain()`: from `Open` only. True when the stage changed (the driver
    /// then sends `GoAway`).
    pub(crate) fn drain(&mut self) -> bool {
        if *self == Lifecycle::Open {
            *self = Lifecycle::Draining;
            return true;
        }
        false
    }

    /// Starts closing with `cause`, unless already closing: the first cause
    /// is the one reported. True when the stage changed.
    pub(crate) fn close(&mut self, cause: CloseCause) -> bool {
        if self.cause().is_some() {
            return false;
        }
        *self = Lifecycle::Closing(cause);
        true
    }

    /// The driver has finished closing.
    pub(crate) fn finish(&mut self) {
        let cause = match std::mem::replace(self, Lifecycle::Open) {
            Lifecycle::Closing(cause) | Lifecycle::Closed(cause) => cause,
            // Closed without passing through Closing: nobody said why.
            Lifecycle::Open | Lifecycle::Draining => CloseCause::ClosedHere,
        };
        *self = Lifecycle::Closed(cause);
    }

    /// The byte mirror of this stage, with whether the peer sent `GoAway`.
    pub(crate) fn stage(&self, peer_goaway: bool) -> Stage {
        let mut bits = 0;
        if peer_goaway {
            bits |= Stage::PEER_GOAWAY;
        }
        match self {
            Lifecycle::Open => {}
            Lifecycle::Draining => bits |= Stage::DRAINING,
            Lifecycle::Closing(_) => bits |= Stage::ENDING,
            Lifecycle::Closed(_) => bits |= Stage::ENDING | Stage::CLOSED,
        }
        Stage(bits)
    }
}

/// A summary of [`Lifecycle`] plus the peer's `GoAway` in one byte, kept in
/// an atomic beside the lock and read without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stage(pub(crate) u8);

impl Stage {
    const PEER_GOAWAY: u8 = 1;
    const DRAINING: u8 = 2;
    const ENDING: u8 = 4;
    const CLOSED: u8 = 8;

    /// The peer sent `GoAway`.
    pub(crate) fn peer_goaway(self) -> bool {
        self.0 & Self::PEER_GOAWAY != 0
    }

    /// This side sent `GoAway` and serves only what it runs.
    pub(crate) fn draining(self) -> bool {
        self.0 & Self::DRAINING != 0
    }

    /// Closing or closed.
    pub(crate) fn ending(self) -> bool {
        self.0 & Self::ENDING != 0
    }

    /// The driver has finished.
    pub(crate) fn closed(self) -> bool {
        self.0 & Self::CLOSED != 0
    }

    /// New calls may go out: not ending, and no `GoAway` from the peer.
    pub(crate) fn usable(self) -> bool {
        self.0 & (Self::ENDING | Self::PEER_GOAWAY) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_cause_is_the_one_kept() {
        let mut life = Lifecycle::Open;
        assert!(life.close(CloseCause::PeerUnresponsive(Duration::from_secs(3))));
        assert!(!life.close(CloseCause::ClosedHere));
        life.finish();
        assert_eq!(
            life,
            Lifecycle::Closed(CloseCause::PeerUnresponsive(Duration::from_secs(3)))
        );
        assert!(matches!(
            life.cause().map(CloseCause::error),
            Some(Error::PeerUnresponsive(_))
        ));
        assert!(!life.drain(), "a closed connection does not drain");
    }

    #[test]
    fn draining_takes_calls_of_this_side_until_it_closes() {
        let mut life = Lifecycle::Open;
        assert!(life.drain());
        assert!(!life.drain(), "GoAway is sent once");
        assert!(life.stage(false).draining() && life.stage(false).usable());
        assert!(life.close(CloseCause::Drained));
        assert!(life.cause().is_some());
        let stage = life.stage(false);
        assert!(stage.ending() && !stage.closed() && !stage.usable());
        life.finish();
        assert!(life.stage(false).closed());
    }

    #[test]
    fn the_peers_goaway_makes_an_open_connection_unusable() {
        let life = Lifecycle::Open;
        assert!(life.stage(false).usable());
        let stage = life.stage(true);
        assert!(stage.peer_goaway() && !stage.usable() && !stage.ending());
    }

    #[test]
    fn causes_say_who_ended_and_how_to_close() {
        use CloseCause::*;
        let broke = PeerBrokeProtocol("too many pings".into());
        assert_eq!(broke.goaway_reason(), Some("too many pings"));
        assert_eq!(broke.initiator(), Initiator::ThisSide);
        assert!(!broke.awaits_peer_close());
        for cause in [ClosedHere, Drained] {
            assert!(cause.awaits_peer_close() && cause.goaway_reason().is_none());
        }
        let gone = PeerClosed("peer closed the connection".into());
        assert_eq!(gone.initiator(), Initiator::Peer);
        assert!(!gone.awaits_peer_close());
        assert_eq!(gone.describe(), "peer closed the connection");
        assert_eq!(ClosedHere.describe(), "closed by this side");
        assert!(
            matches!(Drained.error(), Error::Closed { reason } if reason == "drained after GoAway")
        );
        assert!(!PeerUnresponsive(Duration::from_secs(1)).awaits_peer_close());
    }
}
