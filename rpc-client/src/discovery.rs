//! Discovery: which servers a client calls, and how that set changes.
//!
//! ```text
//!  "a.svc:7443,10.0.0.9:7443"  ─► DNS task: resolve each name (hickory),
//!                                  again at the answer's TTL (5-30 s,
//!                                  jittered) and soon after a connection
//!                                  fails or a server sends GoAway
//!  your own source ─────────────┐
//!  (a Stream of Change)         ├─► Insert(addr, name) / Remove(addr)
//!  discovery::channel() ────────┘        └► the pool (pool.rs)
//! ```
//!
//! - Each address a name resolves to is an endpoint of its own, with the
//!   name as the server name its certificate must be valid for.
//! - An empty or failed answer keeps the last good set (and is tried again
//!   in 5 s): a DNS hiccup must not take every server away.
//! - Names are resolved with `hickory-resolver` from the system's
//!   configuration (`/etc/resolv.conf`, `/etc/hosts`), which reports each
//!   answer's TTL. Where that configuration cannot be read, the system
//!   resolver (`getaddrinfo`) is used with a fixed 30 s TTL.
//! - IPv4 first: a name with A records gives those, one with only AAAA
//!   records gives those (hickory's `Ipv4thenIpv6`).
//!
//! Not here: what an endpoint does with its address (`endpoint.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::Stream;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A change to the set of servers a client calls.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// A server to call at `addr`; its certificate must be valid for
    /// `server_name` (unless the client's builder names one for all).
    Insert {
        /// Where it listens.
        addr: SocketAddr,
        /// The DNS name or IP address its certificate is checked against.
        server_name: String,
    },
    /// The server at this address is gone: calls in flight there finish,
    /// new ones go elsewhere.
    Remove(SocketAddr),
}

impl Change {
    /// [`Change::Insert`].
    pub fn insert(addr: SocketAddr, server_name: impl Into<String>) -> Change {
        Change::Insert {
            addr,
            server_name: server_name.into(),
        }
    }
}

/// A source of [`Change`]s: any `Stream` of them. The client applies each
/// as it comes; the end of the stream leaves the set as it is.
pub trait Discover: Stream<Item = Change> + Send + Unpin + 'static {}

impl<S: Stream<Item = Change> + Send + Unpin + 'static> Discover for S {}

/// A source you feed yourself: send [`Change`]s on the sender, give the
/// receiver to [`ClientBuilder::discover`](crate::ClientBuilder::discover).
pub fn channel() -> (mpsc::UnboundedSender<Change>, Changes) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Changes(rx))
}

/// The receiving end of [`channel`].
#[derive(Debug)]
pub struct Changes(mpsc::UnboundedReceiver<Change>);

impl Stream for Changes {
    type Item = Change;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Change>> {
        self.0.poll_recv(cx)
    }
}

/// The shortest and longest time an answer is used before it is asked
/// again, whatever its TTL.
pub(crate) const TTL_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(5), Duration::from_secs(30));

/// After a failed or empty answer, the name is asked again this soon.
const RETRY_AFTER: Duration = TTL_BOUNDS.0;

/// A refresh asked for by a failing endpoint resolves a name at most this
/// often.
const MIN_REFRESH: Duration = Duration::from_secs(2);

/// One `host:port` the client was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
}

impl Target {
    /// Parses `host:port` or `[v6]:port`.
    pub(crate) fn parse(item: &str) -> Option<Target> {
        let (host, port) = item.trim().rsplit_once(':')?;
        let port = port.parse::<u16>().ok()?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        (!host.is_empty()).then(|| Target {
            host: host.to_owned(),
            port,
        })
    }

    /// The address when the host is an IP address already.
    pub(crate) fn ip(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

/// What a lookup found: addresses, and for how long they hold.
pub(crate) type Answer = Result<(Vec<IpAddr>, Duration), String>;

/// Looks names up; a trait so tests can answer themselves.
pub(crate) trait Lookup: Send + Sync + 'static {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Answer>;
}

/// hickory-resolver over the system's configuration.
struct Hickory(hickory_resolver::TokioResolver);

impl Lookup for Hickory {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Answer> {
        Box::pin(async move {
            let answer = self.0.lookup_ip(host).await.map_err(|e| e.to_string())?;
            let ttl = answer
                .valid_until()
                .saturating_duration_since(std::time::Instant::now());
            Ok((answer.iter().collect(), ttl))
        })
    }
}

/// The system resolver, when hickory cannot read the configuration: no
/// TTL, so the longest bound is used.
struct System;

impl Lookup for System {
    fn lookup<'a>(&'a self, host: &'a str) -> BoxFuture<'a, Answer> {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host, 0))
                .await
                .map_err(|e| e.to_string())?;
            Ok((addrs.map(|a| a.ip()).collect(), TTL_BOUNDS.1))
        })
    }
}

/// The resolver names are looked up with.
pub(crate) fn system_lookup() -> Arc<dyn Lookup> {
    match hickory_resolver::TokioResolver::builder_tokio() {
        Ok(builder) => Arc::new(Hickory(builder.build())),
        Err(e) => {
            debug!(error = %e, "no DNS configuration for hickory; using the system resolver");
            Arc::new(System)
        }
    }
}

/// Resolves every target once: the first set of endpoints, as
/// `(address, server name)`. Fails only when no target gave an address,
/// naming the last failure.
pub(crate) async fn resolve_all(
    targets: &[Target],
    lookup: &dyn Lookup,
) -> Result<(BTreeMap<SocketAddr, String>, Vec<Option<Instant>>), (String, String)> {
    let mut found = BTreeMap::new();
    let mut next = Vec::with_capacity(targets.len());
    let mut failure = None;
    for target in targets {
        if let Some(addr) = target.ip() {
            found.entry(addr).or_insert_with(|| target.host.clone());
            next.push(None);
            continue;
        }
        match lookup.lookup(&target.host).await {
            Ok((ips, ttl)) if !ips.is_empty() => {
                for ip in ips {
                    found
                        .entry(SocketAddr::new(ip, target.port))
                        .or_insert_with(|| target.host.clone());
                }
                next.push(Some(Instant::now() + jittered(ttl)));
            }
            Ok(_) => {
                failure = Some((target.host.clone(), "no addresses found".to_owned()));
                next.push(Some(Instant::now() + RETRY_AFTER));
            }
            Err(e) => {
                failure = Some((target.host.clone(), e));
                next.push(Some(Instant::now() + RETRY_AFTER));
            }
        }
    }
    match failure {
        Some(failure) if found.is_empty() => Err(failure),
        _ => Ok((found, next)),
    }
}

/// A TTL bounded to 5-30 s, less up to a fifth at random, so clients
/// started together do not ask together.
fn jittered(ttl: Duration) -> Duration {
    let ttl = ttl.clamp(TTL_BOUNDS.0, TTL_BOUNDS.1);
    ttl.mul_f64(1.0 - fastrand::f64() * 0.2)
}

/// Keeps names resolved for a client: asks each again when its answer
/// expires (or soon after `refresh` is notified) and sends the difference
/// to `changes`. Ends when `closed` fires or the receiver is gone.
pub(crate) async fn keep_resolved(
    targets: Vec<Target>,
    lookup: Arc<dyn Lookup>,
    first: BTreeMap<SocketAddr, String>,
    mut next: Vec<Option<Instant>>,
    changes: mpsc::UnboundedSender<Change>,
    refresh: Arc<Notify>,
    closed: CancellationToken,
) {
    // Each target's last good answer; the set is their union.
    let mut answers: Vec<BTreeSet<SocketAddr>> = targets
        .iter()
        .map(|t| {
            first
                .keys()
                .filter(|a| a.port() == t.port && first.get(*a) == Some(&t.host))
                .copied()
                .collect()
        })
        .collect();
    let mut current: BTreeMap<SocketAddr, String> = first;
    let mut asked = vec![Instant::now(); targets.len()];
    loop {
        let Some(wake) = next.iter().flatten().min().copied() else {
            return; // IP addresses only: nothing to resolve again.
        };
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = refresh.notified() => {
                // Soon, but not more often than MIN_REFRESH per name.
                for (at, last) in next.iter_mut().zip(&asked) {
                    if let Some(at) = at {
                        *at = (*at).min((*last + MIN_REFRESH).max(Instant::now()));
                    }
                }
                continue;
            }
            _ = closed.cancelled() => return,
        }
        let now = Instant::now();
        for (i, target) in targets.iter().enumerate() {
            let Some(at) = next[i] else { continue };
            if at > now {
                continue;
            }
            asked[i] = now;
            match lookup.lookup(&target.host).await {
                Ok((ips, ttl)) if !ips.is_empty() => {
                    answers[i] = ips
                        .into_iter()
                        .map(|ip| SocketAddr::new(ip, target.port))
                        .collect();
                    next[i] = Some(Instant::now() + jittered(ttl));
                }
                Ok(_) => {
                    info!(name = %target.host, "DNS answer is empty; keeping the last addresses");
                    next[i] = Some(Instant::now() + RETRY_AFTER);
                }
                Err(e) => {
                    warn!(name = %target.host, error = %e, "DNS lookup failed; keeping the last addresses");
                    next[i] = Some(Instant::now() + RETRY_AFTER);
                }
            }
        }
        // The union of the answers, IP-address targets included.
        let mut wanted = BTreeMap::new();
        for (i, target) in targets.iter().enumerate() {
            if let Some(addr) = target.ip() {
                wanted.entry(addr).or_insert_with(|| target.host.clone());
            }
            for addr in &answers[i] {
                wanted.entry(*addr).or_insert_with(|| target.host.clone());
            }
        }
        for addr in current.keys().filter(|a| !wanted.contains_key(a)) {
            info!(%addr, "address no longer in DNS; draining it");
            if changes.send(Change::Remove(*addr)).is_err() {
                return;
            }
        }
        for (addr, name) in wanted.iter().filter(|(a, _)| !current.contains_key(a)) {
            info!(%addr, name = %name, "new address in DNS");
            if changes.send(Change::insert(*addr, name.clone())).is_err() {
                return;
            }
        }
        current = wanted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Answers from a script, one per lookup; the last one repeats.
    struct Scripted(Mutex<Vec<Answer>>);

    impl Lookup for Scripted {
        fn lookup<'a>(&'a self, _host: &'a str) -> BoxFuture<'a, Answer> {
            let mut script = self.0.lock().unwrap();
            let answer = if script.len() > 1 {
                script.remove(0)
            } else {
                script[0].clone()
            };
            Box::pin(async move { answer })
        }
    }

    fn ips(last: &[u8]) -> Vec<IpAddr> {
        last.iter().map(|n| IpAddr::from([127, 0, 0, *n])).collect()
    }

    fn sa(n: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, n], 7443))
    }

    #[test]
    fn targets_parse() {
        let t = Target::parse("svc.local:7443").unwrap();
        assert_eq!((t.host.as_str(), t.port), ("svc.local", 7443));
        assert_eq!(t.ip(), None);
        let t = Target::parse("[::1]:9").unwrap();
        assert_eq!(t.ip(), Some("[::1]:9".parse().unwrap()));
        assert!(Target::parse("no-port").is_none());
        assert!(Target::parse(":1").is_none());
        assert!(Target::parse("h:99999").is_none());
    }

    #[test]
    fn ttls_are_bounded_and_jittered() {
        for ttl in [0, 1, 10, 30, 3600] {
            let wait = jittered(Duration::from_secs(ttl));
            assert!(
                wait >= Duration::from_secs(4) && wait <= Duration::from_secs(30),
                "{wait:?}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn changes_follow_the_answers_and_bad_answers_keep_the_set() {
        let ttl = Duration::from_secs(10);
        let lookup = Arc::new(Scripted(Mutex::new(vec![
            Ok((ips(&[2, 3]), ttl)),
            Ok((ips(&[2, 3, 4]), ttl)),
            Err("SERVFAIL".into()),
            Ok((vec![], ttl)),
            Ok((ips(&[4]), ttl)),
        ])));
        let targets = vec![Target::parse("svc:7443").unwrap()];
        let (first, next) = resolve_all(&targets, lookup.as_ref()).await.unwrap();
        assert_eq!(
            first.keys().copied().collect::<Vec<_>>(),
            vec![sa(2), sa(3)]
        );
        assert_eq!(first[&sa(2)], "svc");
        let (tx, mut rx) = mpsc::unbounded_channel();
        let closed = CancellationToken::new();
        let task = tokio::spawn(keep_resolved(
            targets,
            lookup,
            first,
            next,
            tx,
            Arc::new(Notify::new()),
            closed.clone(),
        ));
        assert_eq!(rx.recv().await, Some(Change::insert(sa(4), "svc")));
        // The failure and the empty answer change nothing; then 4 alone.
        let removed: Vec<_> = [rx.recv().await, rx.recv().await]
            .into_iter()
            .flatten()
            .collect();
        assert_eq!(removed, vec![Change::Remove(sa(2)), Change::Remove(sa(3))]);
        closed.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_asks_again_soon_but_not_in_a_loop() {
        let ttl = Duration::from_secs(30);
        let lookup = Arc::new(Scripted(Mutex::new(vec![
            Ok((ips(&[2]), ttl)),
            Ok((ips(&[3]), ttl)),
        ])));
        let targets = vec![Target::parse("svc:7443").unwrap()];
        let (first, next) = resolve_all(&targets, lookup.as_ref()).await.unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let refresh = Arc::new(Notify::new());
        let closed = CancellationToken::new();
        let started = Instant::now();
        tokio::spawn(keep_resolved(
            targets,
            lookup,
            first,
            next,
            tx,
            refresh.clone(),
            closed.clone(),
        ));
        refresh.notify_one();
        assert_eq!(rx.recv().await, Some(Change::Remove(sa(2))));
        assert_eq!(rx.recv().await, Some(Change::insert(sa(3), "svc")));
        let took = started.elapsed();
        assert!(
            took >= MIN_REFRESH && took < Duration::from_secs(3),
            "re-resolved {took:?} after the refresh (TTL 30 s)"
        );
        closed.cancel();
    }

    #[tokio::test]
    async fn a_name_that_does_not_resolve_is_an_error() {
        let lookup = Scripted(Mutex::new(vec![Err("NXDOMAIN".into())]));
        let targets = vec![Target::parse("nowhere:1").unwrap()];
        let (name, why) = resolve_all(&targets, &lookup).await.unwrap_err();
        assert_eq!((name.as_str(), why.as_str()), ("nowhere", "NXDOMAIN"));
        // An IP address beside it is enough to start.
        let targets = vec![
            Target::parse("nowhere:1").unwrap(),
            Target::parse("127.0.0.2:7443").unwrap(),
        ];
        let (found, _) = resolve_all(&targets, &lookup).await.unwrap();
        assert_eq!(found.keys().copied().collect::<Vec<_>>(), vec![sa(2)]);
    }
}
