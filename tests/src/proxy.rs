//! A fault-injecting TCP proxy for liveness tests, on 127.0.0.1 only.
//!
//! ```text
//! client ──► FaultProxy (127.0.0.1:port) ──► upstream server
//!            freeze:   stop forwarding both ways, keep both sockets open
//!            hold_replies: stop forwarding server -> client only
//!            throttle: at most N bytes/s per direction per connection
//!            reset:    RST every open connection (both sides)
//! ```
//!
//! A frozen proxy is what TCP cannot see: a stopped process or a black-holed
//! path, with the sockets still open. Every loop here ends when the proxy is
//! dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

struct Controls {
    frozen: watch::Receiver<bool>,
    /// Set for the server -> client direction only.
    held: Option<watch::Receiver<bool>>,
    /// Bytes this direction has forwarded, if counted.
    forwarded: Option<Arc<AtomicU64>>,
    /// Bytes this direction has read (held or not), if counted.
    read: Option<Arc<AtomicU64>>,
    /// Bytes per second per direction; 0 = unlimited.
    rate: Arc<AtomicU64>,
    reset: watch::Receiver<u64>,
    stop: CancellationToken,
}

impl Clone for Controls {
    fn clone(&self) -> Self {
        Controls {
            frozen: self.frozen.clone(),
            held: self.held.clone(),
            forwarded: self.forwarded.clone(),
            read: self.read.clone(),
            rate: self.rate.clone(),
            reset: self.reset.clone(),
            stop: self.stop.clone(),
        }
    }
}

/// A TCP proxy whose faults the test switches on and off.
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    upstream: Arc<Mutex<SocketAddr>>,
    frozen: watch::Sender<bool>,
    held: watch::Sender<bool>,
    sent_up: Arc<AtomicU64>,
    read_down: Arc<AtomicU64>,
    rate: Arc<AtomicU64>,
    reset: watch::Sender<u64>,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 and forwards each connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (frozen, frozen_rx) = watch::channel(false);
        let (held, held_rx) = watch::channel(false);
        let sent_up = Arc::new(AtomicU64::new(0));
        let read_down = Arc::new(AtomicU64::new(0));
        let (reset, reset_rx) = watch::channel(0u64);
        let rate = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let upstream = Arc::new(Mutex::new(upstream));
        let accepted = Arc::new(AtomicUsize::new(0));
        let controls = Controls {
            frozen: frozen_rx,
            held: None,
            forwarded: None,
            read: None,
            rate: rate.clone(),
            reset: reset_rx,
            stop: stop.clone(),
        };
        {
            let upstream = upstream.clone();
            let accepted = accepted.clone();
            let sent_up = sent_up.clone();
            let read_down = read_down.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                loop {
                    let (client, _) = tokio::select! {
                        a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
                        _ = stop.cancelled() => return,
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let target = *upstream.lock().unwrap();
                    let up = Controls {
                        forwarded: Some(sent_up.clone()),
                        ..controls.clone()
                    };
                    let down = Controls {
                        held: Some(held_rx.clone()),
                        read: Some(read_down.clone()),
                        ..controls.clone()
                    };
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(target).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::join!(pump(cr, sw, up), pump(sr, cw, down));
                    });
                }
            });
        }
        FaultProxy {
            addr,
            upstream,
            frozen,
            held,
            sent_up,
            read_down,
            rate,
            reset,
            accepted,
            stop,
        }
    }

    /// `127.0.0.1:PORT` of the proxy.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Stops (`true`) or resumes (`false`) forwarding; sockets stay open.
    pub fn freeze(&self, frozen: bool) {
        self.frozen.send_replace(frozen);
    }

    /// Stops (`true`) or resumes (`false`) forwarding from the server to
    /// the client only: the client's frames still reach the server, and
    /// what the server sends waits here.
    pub fn hold_replies(&self, held: bool) {
        self.held.send_replace(held);
    }

    /// Bytes forwarded from clients to the server so far, over all
    /// connections: grows once a client's frame has left for the server.
    pub fn sent_up(&self) -> u64 {
        self.sent_up.load(Ordering::SeqCst)
    }

    /// Bytes read from the server so far, over all connections, whether
    /// forwarded or held: grows once the server has sent something.
    pub fn read_down(&self) -> u64 {
        self.read_down.load(Ordering::SeqCst)
    }

    /// Limits each direction of each connection to `bytes_per_sec`
    /// (0 = unlimited).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Resets (RST) every connection open now.
    pub fn reset_all(&self) {
        self.reset.send_modify(|g| *g += 1);
    }

    /// Sends new connections to another upstream.
    pub fn set_upstream(&self, addr: SocketAddr) {
        *self.upstream.lock().unwrap() = addr;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Why a pump stopped early.
enum Halt {
    Reset,
    Stop,
}

/// Waits while frozen (or, with `or_held`, held: replies are read, then
/// kept until released); returns why it must stop, if it must.
async fn thaw(c: &mut Controls, seen_reset: u64, or_held: bool) -> Result<(), Halt> {
    loop {
        if *c.reset.borrow() != seen_reset {
            return Err(Halt::Reset);
        }
        let held = or_held && c.held.as_ref().is_some_and(|h| *h.borrow());
        if !*c.frozen.borrow() && !held {
            return Ok(());
        }
        let held_changed = async {
            match c.held.as_mut() {
                Some(h) => {
                    let _ = h.changed().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = c.frozen.changed() => {}
            _ = held_changed => {}
            _ = c.reset.changed() => {}
            _ = c.stop.cancelled() => return Err(Halt::Stop),
        }
    }
}

/// Forwards one direction under the current faults.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mut c: Controls) {
    // Only resets from now on concern this connection.
    let seen_reset = *c.reset.borrow_and_update();
    c.frozen.borrow_and_update();
    if let Some(h) = c.held.as_mut() {
        h.borrow_and_update();
    }
    let mut buf = vec![0u8; 64 * 1024];
    let halt = loop {
        if let Err(h) = thaw(&mut c, seen_reset, false).await {
            break h;
        }
        let rate = c.rate.load(Ordering::SeqCst);
        // Throttled: slices of 1/20 s worth of bytes.
        let max = if rate == 0 {
            buf.len()
        } else {
            ((rate / 20).max(1) as usize).min(buf.len())
        };
        let n = tokio::select! {
            r = from.read(&mut buf[..max]) => match r {
                Ok(0) | Err(_) => { let _ = to.shutdown().await; return; }
                Ok(n) => {
                    if let Some(read) = &c.read {
                        read.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    n
                }
            },
            _ = c.reset.changed() => break Halt::Reset,
            _ = c.frozen.changed() => continue,
            _ = c.stop.cancelled() => break Halt::Stop,
        };
        // Bytes read just before a freeze, or while held, wait for the thaw.
        if let Err(h) = thaw(&mut c, seen_reset, true).await {
            break h;
        }
        let write = to.write_all(&buf[..n]);
        tokio::select! {
            r = write => if r.is_err() { return },
            _ = c.reset.changed() => break Halt::Reset,
            _ = c.stop.cancelled() => break Halt::Stop,
        }
        if let Some(forwarded) = &c.forwarded {
            forwarded.fetch_add(n as u64, Ordering::SeqCst);
        }
        if rate > 0 {
            let pause = Duration::from_secs_f64(n as f64 / rate as f64);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = c.reset.changed() => break Halt::Reset,
                _ = c.stop.cancelled() => break Halt::Stop,
            }
        }
    };
    if let Halt::Reset = halt {
        // Linger 0: closing sends RST at once (and does not block, which is
        // why tokio deprecates longer lingers).
        #[allow(deprecated)]
        {
            let _ = from.as_ref().set_linger(Some(Duration::ZERO));
            let _ = to.as_ref().set_linger(Some(Duration::ZERO));
        }
    }
}
