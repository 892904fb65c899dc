//! `upload`, `download` and `files`: the file service of
//! `rpc-server --files DIR`, with SHA-256 checked on both sides and a
//! progress bar on stderr when it is a terminal.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use rpc_client::Client;
use rpc_core::files::{hex, DownloadPiece, FilesClient, Sha256, UploadPiece, PIECE};
use rpc_core::CallOptions;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Arguments of `upload`.
#[derive(clap::Args, Debug)]
pub(crate) struct UploadArgs {
    /// The file to send.
    local: PathBuf,
    /// Its name on the server [default: LOCAL's file name].
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Deadline of the whole transfer.
    #[arg(long, value_name = "D", default_value = "1h", value_parser = humantime::parse_duration)]
    deadline: Duration,
}

/// Arguments of `download`.
#[derive(clap::Args, Debug)]
pub(crate) struct DownloadArgs {
    /// The file's name on the server.
    name: String,
    /// Where to write it.
    local: PathBuf,
    /// Continue a download that stopped: keep LOCAL's bytes and ask for
    /// the rest (the whole file's SHA-256 is still checked).
    #[arg(long)]
    resume: bool,
    /// Deadline of the whole transfer.
    #[arg(long, value_name = "D", default_value = "1h", value_parser = humantime::parse_duration)]
    deadline: Duration,
}

/// A bar with bytes, rate and ETA on stderr, or nothing when stderr is not
/// a terminal.
fn progress(total: u64) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style);
    }
    bar
}

/// `upload LOCAL [--name NAME]`: prints `uploaded NAME BYTES sha256 HEX`.
pub(crate) async fn upload(client: Client, args: UploadArgs) -> anyhow::Result<()> {
    let name = match args.name {
        Some(name) => name,
        None => args
            .local
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("LOCAL has no file name; give --name")?,
    };
    let file = tokio::fs::File::open(&args.local)
        .await
        .with_context(|| format!("cannot open {}", args.local.display()))?;
    let total = file.metadata().await?.len();
    let bar = progress(total);
    // A read error ends the stream without its checksum (the server then
    // stores nothing) and is reported here.
    let failed: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
    let pieces = read_pieces(file, bar.clone(), failed.clone());
    let files = FilesClient::new(client).with_options(CallOptions::new().timeout(args.deadline));
    let stored = files.upload(name.clone(), pieces).await;
    bar.finish_and_clear();
    if let Some(e) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e).with_context(|| format!("reading {}", args.local.display()));
    }
    let stored = stored.with_context(|| format!("upload of {name:?} failed"))?;
    println!(
        "uploaded {} {} sha256 {}",
        stored.name,
        stored.size,
        hex(&stored.sha256)
    );
    Ok(())
}

/// The pieces of `file`, then `Done` with their SHA-256.
fn read_pieces(
    file: tokio::fs::File,
    bar: ProgressBar,
    failed: Arc<Mutex<Option<std::io::Error>>>,
) -> impl futures_util::Stream<Item = UploadPiece> + Send + 'static {
    let state = Some((file, Sha256::default()));
    futures_util::stream::unfold(state, move |state| {
        let (bar, failed) = (bar.clone(), failed.clone());
        async move {
            let (mut file, mut hash) = state?;
            let mut buf = vec![0u8; PIECE];
            let mut filled = 0;
            // Whole pieces: a short read is not the end.
            while filled < PIECE {
                match file.read(&mut buf[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) => {
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                        return None;
                    }
                }
            }
            if filled == 0 {
                return Some((
                    UploadPiece::Done {
                        sha256: hash.finish(),
                    },
                    None,
                ));
            }
            buf.truncate(filled);
            hash.update(&buf);
            bar.inc(filled as u64);
            Some((UploadPiece::Data(Bytes::from(buf)), Some((file, hash))))
        }
    })
}

/// `download NAME LOCAL [--resume]`: prints `downloaded NAME BYTES sha256 HEX`.
pub(crate) async fn download(client: Client, args: DownloadArgs) -> anyhow::Result<()> {
    let (mut file, offset, mut hash) = open_local(&args.local, args.resume).await?;
    let files = FilesClient::new(client).with_options(CallOptions::new().timeout(args.deadline));
    let mut pieces = files
        .download(args.name.clone(), offset)
        .await
        .with_context(|| format!("download of {:?} failed", args.name))?;
    let bar = progress(0);
    bar.set_position(offset);
    let mut written = offset;
    let (size, sha256) = loop {
        let piece = pieces
            .next()
            .await
            .with_context(|| format!("download of {:?} ended early", args.name))?
            .with_context(|| format!("download of {:?} failed", args.name))?;
        match piece {
            DownloadPiece::Data(bytes) => {
                hash.update(&bytes);
                file.write_all(&bytes)
                    .await
                    .with_context(|| format!("writing {}", args.local.display()))?;
                written += bytes.len() as u64;
                bar.set_position(written);
            }
            DownloadPiece::Done { size, sha256 } => break (size, sha256),
        }
    };
    file.flush().await?;
    bar.finish_and_clear();
    let ours = hash.finish();
    if written != size || ours != sha256 {
        anyhow::bail!(
            "download of {:?}: {} has {written} bytes with SHA-256 {}, the server's file {size} bytes with {}; \
             the local file is kept, download it again without --resume",
            args.name,
            args.local.display(),
            hex(&ours),
            hex(&sha256)
        );
    }
    println!("downloaded {} {size} sha256 {}", args.name, hex(&sha256));
    Ok(())
}

/// LOCAL opened for writing: from its end when resuming (its bytes hashed
/// already), or truncated.
async fn open_local(path: &Path, resume: bool) -> anyhow::Result<(tokio::fs::File, u64, Sha256)> {
    let mut hash = Sha256::default();
    if !resume {
        let file = tokio::fs::File::create(path)
            .await
            .with_context(|| format!("cannot create {}", path.display()))?;
        return Ok((file, 0, hash));
    }
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut buf = vec![0u8; PIECE];
    let mut offset = 0u64;
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        offset += n as u64;
    }
    Ok((file, offset, hash))
}

/// `files`: one `NAME BYTES` line per file.
pub(crate) async fn list(client: Client) -> anyhow::Result<()> {
    for entry in FilesClient::new(client).list().await? {
        println!("{} {}", entry.name, entry.size);
    }
    Ok(())
}
