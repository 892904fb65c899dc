//! `rpc-client upload`, `download` and `files` against an in-process
//! server with the file service on 127.0.0.1: the lines they print, the
//! checksums, resuming, and refused names.

// Test code: a panic is how a test reports failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rpc_core::files::FilesServer;
use rpc_server::files::FileStore;
use rpc_server::{demo, devcerts, Server};

struct Fixture {
    dir: tempfile::TempDir,
    served: PathBuf,
    addr: String,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    devcerts::write_to(dir.path()).unwrap();
    let served = dir.path().join("served");
    std::fs::create_dir(&served).unwrap();
    let p = |n: &str| dir.path().join(n);
    let tls = rpc_core::tls::server_config(&p("server.pem"), &p("server.key"), None).unwrap();
    let router = demo::router().service(FilesServer::new(FileStore::open(&served).unwrap()));
    let server = Server::builder(tls).router(router).build().unwrap();
    let listener = Server::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { server.serve(listener, std::future::pending()).await });
    Fixture { dir, served, addr }
}

impl Fixture {
    async fn run(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rpc-client"));
        cmd.arg("--connect")
            .arg(&self.addr)
            .arg("--ca")
            .arg(self.dir.path().join("ca.pem"))
            .args(args);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    async fn run_with_stdin(&self, args: &[&str], input: &str) -> Output {
        use std::io::Write;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rpc-client"));
        cmd.arg("--connect")
            .arg(&self.addr)
            .arg("--ca")
            .arg(self.dir.path().join("ca.pem"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let input = input.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut child = cmd.spawn().unwrap();
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
            child.wait_with_output().unwrap()
        })
        .await
        .unwrap()
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn sha256_hex(path: &Path) -> String {
    let mut h = rpc_core::files::Sha256::default();
    h.update(&std::fs::read(path).unwrap());
    rpc_core::files::hex(&h.finish())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_files_and_download_print_one_line_each_with_the_checksum() {
    let f = start().await;
    let local = f.path("data.bin");
    let bytes: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    std::fs::write(&local, &bytes).unwrap();
    let sha = sha256_hex(Path::new(&local));

    let out = f.run(&["upload", &local, "--name", "stored.bin"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("uploaded stored.bin 3000000 sha256 {sha}\n")
    );
    // stderr is not a terminal here: no progress bar at all.
    assert_eq!(stderr(&out), "");
    assert_eq!(std::fs::read(f.served.join("stored.bin")).unwrap(), bytes);

    let out = f.run(&["files"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "stored.bin 3000000\n");

    let back = f.path("back.bin");
    let out = f.run(&["download", "stored.bin", &back]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("downloaded stored.bin 3000000 sha256 {sha}\n")
    );
    assert_eq!(std::fs::read(&back).unwrap(), bytes);

    // An interrupted download (a third of the file), resumed.
    std::fs::write(&back, &bytes[..1_000_000]).unwrap();
    let out = f.run(&["download", "stored.bin", &back, "--resume"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("downloaded stored.bin 3000000 sha256 {sha}\n")
    );
    assert_eq!(std::fs::read(&back).unwrap(), bytes);

    // Resumed onto a file that is not a prefix: the checksum says so.
    std::fs::write(&back, b"not the start of it").unwrap();
    let out = f.run(&["download", "stored.bin", &back, "--resume"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("SHA-256"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_name_exits_non_zero_and_says_why() {
    let f = start().await;
    let local = f.path("x");
    std::fs::write(&local, b"x").unwrap();
    for (args, why) in [
        (
            vec!["upload", local.as_str(), "--name", "../escape"],
            "'..'",
        ),
        (
            vec!["upload", local.as_str(), "--name", "/etc/passwd"],
            "absolute",
        ),
        (vec!["download", "../ca.key", local.as_str()], "'..'"),
        (vec!["download", "missing", local.as_str()], "no file"),
    ] {
        let out = f.run(&args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(stderr(&out).contains(why), "{args:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), "");
    }
    assert!(!f.dir.path().join("escape").exists());
    let out = f.run(&["upload", &f.path("does-not-exist")]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("cannot open"), "{}", stderr(&out));
}

/// The file service's stream methods through `call` by schema: upload
/// items from stdin, one JSON value per line; download items one per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_methods_by_schema_read_items_from_stdin_and_print_one_per_line() {
    let f = start().await;
    let mut h = rpc_core::files::Sha256::default();
    h.update(b"hi");
    let sha: Vec<String> = h.finish().iter().map(u8::to_string).collect();
    let items = format!(
        "{{\"Data\": [104, 105]}}\n\n{{\"Done\": {{\"sha256\": [{}]}}}}\n",
        sha.join(",")
    );
    let out = f
        .run_with_stdin(&["call", "Files.upload", r#"{"name": "hi.txt"}"#], &items)
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "{{\"name\":\"hi.txt\",\"size\":2,\"sha256\":[{}]}}\n",
            sha.join(",")
        )
    );
    assert_eq!(std::fs::read(f.served.join("hi.txt")).unwrap(), b"hi");

    let out = f
        .run(&[
            "call",
            "Files.download",
            r#"{"name": "hi.txt", "offset": 1}"#,
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!(
            "{{\"Data\":[105]}}\n{{\"Done\":{{\"size\":2,\"sha256\":[{}]}}}}\n",
            sha.join(",")
        )
    );

    // An item that does not fit: refused before the stream opens.
    let out = f
        .run_with_stdin(
            &["call", "Files.upload", r#"{"name": "no.txt"}"#],
            "{\"Data\": \"hi\"}\n",
        )
        .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("refused before sending: item 0.Data: expected an array of bytes"),
        "{}",
        stderr(&out)
    );
    assert!(!f.served.join("no.txt").exists());
}
