//! The file service over real TLS on 127.0.0.1: 256 MiB each way with
//! SHA-256 checked, small calls beside it, confinement, interrupted uploads,
//! resumed downloads, cancellation, and a throttled link.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use rpc_client::Client;
use rpc_core::files::{DownloadPiece, FilesClient, FilesServer, Sha256, UploadPiece, PIECE};
use rpc_core::{CallOptions, StatusCode};
use rpc_server::demo::DemoClient;
use rpc_server::files::FileStore;
use rpc_server::ServerOptions;
use rpc_tests::{FaultProxy, TestServer};

async fn serve(dir: &Path, options: ServerOptions) -> TestServer {
    let router =
        rpc_server::demo::router().service(FilesServer::new(FileStore::open(dir).unwrap()));
    TestServer::start(router, options).await
}

/// `len` bytes of a fixed pseudo-random sequence, as upload pieces, then
/// `Done` with their SHA-256 (or `wrong` instead).
fn generated(len: u64, seed: u64, wrong: bool) -> impl Stream<Item = UploadPiece> + Send + 'static {
    let state = Some((0u64, seed, Sha256::default()));
    futures_util::stream::unfold(state, move |state| async move {
        let (sent, x, mut hash) = state?;
        if sent == len {
            let mut sha256 = hash.finish();
            if wrong {
                sha256[0] ^= 1;
            }
            return Some((UploadPiece::Done { sha256 }, None));
        }
        let n = (len - sent).min(PIECE as u64) as usize;
        let (bytes, x) = fill(n, x);
        hash.update(&bytes);
        Some((UploadPiece::Data(bytes), Some((sent + n as u64, x, hash))))
    })
}

/// `n` bytes of xorshift64 from state `x`, and the state after.
fn fill(n: usize, mut x: u64) -> (Bytes, u64) {
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    (Bytes::from(out), x)
}

/// SHA-256 of what `generated(len, seed, false)` sends.
fn sha_of(len: u64, seed: u64) -> [u8; 32] {
    let mut hash = Sha256::default();
    let (mut sent, mut x) = (0u64, seed);
    while sent < len {
        let n = (len - sent).min(PIECE as u64) as usize;
        let (bytes, next) = fill(n, x);
        hash.update(&bytes);
        x = next;
        sent += n as u64;
    }
    hash.finish()
}

/// Downloads `name` from `offset`: the bytes' count, their SHA-256 on top
/// of `hash`, and the server's `Done`.
async fn download(
    files: &FilesClient<Client>,
    name: &str,
    offset: u64,
    mut hash: Sha256,
) -> (u64, [u8; 32], (u64, [u8; 32])) {
    let mut stream = files.download(name.into(), offset).await.unwrap();
    let mut got = 0u64;
    loop {
        match stream.message().await.unwrap().expect("a Done piece") {
            DownloadPiece::Data(bytes) => {
                hash.update(&bytes);
                got += bytes.len() as u64;
            }
            DownloadPiece::Done { size, sha256 } => {
                assert_eq!(stream.message().await.unwrap(), None, "Done is last");
                return (got, hash.finish(), (size, sha256));
            }
        }
    }
}

/// Names in `dir`, hidden ones too, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn long() -> CallOptions {
    CallOptions::new().timeout(Duration::from_secs(600))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_256_mib_file_goes_up_and_down_whole_while_small_calls_stay_quick() {
    const LEN: u64 = 256 << 20;
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), ServerOptions::default()).await;
    let client = server.client().await;
    let files = FilesClient::new(client.clone()).with_options(long());
    let want = sha_of(LEN, 7);

    let started = Instant::now();
    let stored = files
        .upload("big.bin".into(), generated(LEN, 7, false))
        .await
        .unwrap();
    let up = started.elapsed();
    assert_eq!((stored.size, stored.sha256), (LEN, want));
    assert_eq!(
        std::fs::metadata(dir.path().join("big.bin")).unwrap().len(),
        LEN
    );
    assert_eq!(names(dir.path()), ["big.bin"], "no temporary file left");

    // Down again, with small calls and pings on the same connection.
    let demo = DemoClient::new(client.clone());
    let transfer = tokio::spawn({
        let files = files.clone();
        async move {
            let started = Instant::now();
            let result = download(&files, "big.bin", 0, Sha256::default()).await;
            (result, started.elapsed())
        }
    });
    // Small calls one after another for as long as the download runs.
    let mut worst_call = Duration::ZERO;
    let mut worst_ping = Duration::ZERO;
    let mut n = 0u32;
    while !transfer.is_finished() && n < 100_000 {
        let t = Instant::now();
        assert_eq!(demo.echo("beside".into()).await.unwrap(), "beside");
        worst_call = worst_call.max(t.elapsed());
        // Within the server's burst allowance of 8 pings (more, faster than
        // its heartbeat interval, is a flood it cuts off).
        if n % 100 == 0 && n < 800 {
            let t = Instant::now();
            client.ping().await.unwrap();
            worst_ping = worst_ping.max(t.elapsed());
        }
        n += 1;
    }
    let ((got, sha, done), down) = transfer.await.unwrap();
    assert!(n >= 10, "only {n} calls overlapped the download");
    assert_eq!((got, sha), (LEN, want));
    assert_eq!(done, (LEN, want));
    eprintln!(
        "256 MiB up in {up:?}, down in {down:?}; beside it {n} echo calls, slowest {worst_call:?}, slowest ping {worst_ping:?}"
    );
    // Generous for a debug build on two cores: a call waits behind at most
    // one 64 KiB piece of the stream, not behind the stream.
    assert!(worst_call < Duration::from_millis(500), "{worst_call:?}");
    assert!(worst_ping < Duration::from_millis(500), "{worst_ping:?}");
}

#[tokio::test]
async fn names_that_lead_out_of_the_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"not yours").unwrap();
    std::os::unix::fs::symlink(outside.path().join("secret"), dir.path().join("link")).unwrap();
    std::os::unix::fs::symlink(outside.path(), dir.path().join("out")).unwrap();
    let server = serve(dir.path(), ServerOptions::default()).await;
    let files = FilesClient::new(server.client().await);

    for (name, code, why) in [
        ("../x", StatusCode::InvalidArgument, "'..'"),
        ("/etc/passwd", StatusCode::InvalidArgument, "absolute"),
        ("link", StatusCode::PermissionDenied, "outside"),
        ("out/secret", StatusCode::PermissionDenied, "outside"),
    ] {
        let e = match files.download(name.into(), 0).await {
            Ok(mut s) => s.message().await.unwrap_err(),
            Err(rpc_client::ClientError::Call(rpc_core::Error::Status(s))) => s,
            Err(other) => panic!("{name}: {other}"),
        };
        assert_eq!(e.code, code, "{name}: {e}");
        assert!(e.message.contains(why), "{name}: {e}");
        let up = files
            .upload(name.into(), generated(10, 1, false))
            .await
            .unwrap_err();
        assert!(up.to_string().contains(why), "{name}: {up}");
    }
    assert_eq!(names(outside.path()), ["secret"], "nothing written outside");
    assert_eq!(
        std::fs::read(outside.path().join("secret")).unwrap(),
        b"not yours"
    );
    assert_eq!(names(dir.path()), ["link", "out"]);
}

#[tokio::test]
async fn an_upload_that_does_not_finish_leaves_no_file_under_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), ServerOptions::default()).await;
    let files = FilesClient::new(server.client().await);

    // Ended without its checksum.
    let cut = generated(1 << 20, 3, false).take(5);
    let e = files.upload("cut".into(), cut).await.unwrap_err();
    assert!(e.to_string().contains("ended before its checksum"), "{e}");
    // A checksum that does not match.
    let e = files
        .upload("bad".into(), generated(1 << 20, 3, true))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("SHA-256"), "{e}");
    // Cancelled mid-way: the caller drops the upload.
    let (tx, rx) = tokio::sync::mpsc::channel::<UploadPiece>(1);
    let stalled =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
    let upload = tokio::spawn({
        let files = files.clone();
        async move { files.upload("dropped".into(), stalled).await }
    });
    for _ in 0..4 {
        tx.send(UploadPiece::Data(Bytes::from(vec![1u8; PIECE])))
            .await
            .unwrap();
    }
    // The temporary file exists while the upload runs...
    wait_for(|| names(dir.path()).iter().any(|n| n.starts_with(".dropped."))).await;
    upload.abort();
    // ...and goes with it.
    wait_for(|| names(dir.path()).is_empty()).await;
    // Nothing under any of the names, and the server serves on.
    let stored = files
        .upload("ok".into(), generated(100, 1, false))
        .await
        .unwrap();
    assert_eq!(stored.size, 100);
    assert_eq!(names(dir.path()), ["ok"]);
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not met within 5 s");
}

/// Open file descriptors of this process (client and server both).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[tokio::test]
async fn a_download_resumes_from_an_offset_and_a_cancelled_one_leaves_nothing_open() {
    const LEN: u64 = 8 << 20;
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), ServerOptions::default()).await;
    let client = server.client().await;
    let files = FilesClient::new(client.clone());
    files
        .upload("f".into(), generated(LEN, 9, false))
        .await
        .unwrap();
    let baseline = open_fds();

    // Interrupted: the caller takes a few pieces and drops the stream.
    let mut hash = Sha256::default();
    let mut got = 0u64;
    {
        let mut stream = files.download("f".into(), 0).await.unwrap();
        for _ in 0..5 {
            match stream.message().await.unwrap().unwrap() {
                DownloadPiece::Data(bytes) => {
                    hash.update(&bytes);
                    got += bytes.len() as u64;
                }
                DownloadPiece::Done { .. } => panic!("too early"),
            }
        }
    }
    // The server's handler and its file go with the cancelled stream.
    wait_for(|| open_fds() <= baseline).await;
    for _ in 0..500 {
        // The stats call itself is the one in flight.
        if client.stats().await.unwrap().calls_in_flight == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(client.stats().await.unwrap().calls_in_flight, 1);
    // Resumed from where it stopped: the whole file checks out.
    let (rest, sha, (size, want)) = download(&files, "f", got, hash).await;
    assert_eq!(got + rest, LEN);
    assert_eq!((size, sha), (LEN, want));
    assert_eq!(want, sha_of(LEN, 9));
    // An offset past the end is refused clearly.
    let mut past = files.download("f".into(), LEN + 1).await.unwrap();
    let e = past.message().await.unwrap_err();
    assert_eq!(e.code, StatusCode::OutOfRange, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_transfer_keeps_its_connection_alive_on_heartbeats() {
    const LEN: u64 = 3 << 20;
    let dir = tempfile::tempdir().unwrap();
    let mut options = ServerOptions::default();
    options.connection.heartbeat_interval = Duration::from_millis(250);
    options.connection.heartbeat_timeout = Duration::from_secs(1);
    let server = serve(dir.path(), options.clone()).await;
    let proxy = FaultProxy::start(server.addr).await;
    proxy.throttle(1 << 20);
    let client = rpc_tests::replicas::builder(&server.certs)
        .connection_config(options.connection.clone())
        .connect(&proxy.address())
        .await
        .unwrap();
    let files = FilesClient::new(client.clone()).with_options(long());
    let started = Instant::now();
    let stored = files
        .upload("slow".into(), generated(LEN, 5, false))
        .await
        .unwrap();
    let (got, sha, _) = download(&files, "slow", 0, Sha256::default()).await;
    let took = started.elapsed();
    assert_eq!((stored.size, got, sha), (LEN, LEN, sha_of(LEN, 5)));
    // 6 MiB at 1 MiB/s each way: several heartbeat timeouts long, on one
    // connection that was never declared dead.
    assert!(took > Duration::from_secs(4), "{took:?}: the throttle held");
    assert_eq!(
        proxy.accepted(),
        1,
        "no reconnect: the peer never looked dead"
    );
}
