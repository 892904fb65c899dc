//! The file service (`rpc-server --files DIR`): uploads, downloads with a
//! start offset, and a listing, confined to one directory.
//!
//! ```text
//! name ─► check_name (clear errors for the obvious) ─► cap-std Dir (the
//!   confinement: opens beneath DIR, refusing `..`, absolute paths and
//!   symlinks that lead out, whatever the name checks missed)
//! upload:   .NAME.RANDOM.part ─ pieces, SHA-256 ─ Done matches ─► rename to NAME
//!           (dropped, failed or mismatched: the temporary file is removed)
//! download: SHA-256 of bytes before the offset, then the rest in pieces,
//!           then Done { size, sha256 }
//! ```
//!
//! File I/O runs on tokio's blocking pool (`tokio::fs::File` over the
//! descriptor cap-std opened).
//!
//! Not here: the service's contract and types (rpc-core's `files.rs`).

use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions};
use futures_util::StreamExt;
use rpc_core::files::{DownloadPiece, FileEntry, Files, Sha256, Stored, UploadPiece, PIECE};
use rpc_core::streaming::{ServerStream, Streaming};
use rpc_core::Status;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{debug, info};

/// Largest file an upload may write, by default: 64 GiB.
pub const DEFAULT_MAX_FILE: u64 = 64 << 30;

/// Files under one directory; implements [`Files`] (serve it with
/// `FilesServer::new(store)`).
#[derive(Clone)]
pub struct FileStore {
    dir: Arc<Dir>,
    root: PathBuf,
    max_file: u64,
}

impl std::fmt::Debug for FileStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileStore")
            .field("root", &self.root)
            .finish()
    }
}

impl FileStore {
    /// The files under `root`, which must be a directory.
    pub fn open(root: &Path) -> io::Result<FileStore> {
        let dir = Dir::open_ambient_dir(root, ambient_authority())?;
        Ok(FileStore {
            dir: Arc::new(dir),
            root: root.to_path_buf(),
            max_file: DEFAULT_MAX_FILE,
        })
    }

    /// The same store with another upload size limit.
    pub fn max_file(mut self, bytes: u64) -> FileStore {
        self.max_file = bytes;
        self
    }

    /// Runs `f` on the directory on the blocking pool.
    async fn blocking<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Dir) -> io::Result<T> + Send + 'static,
    {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || f(&dir))
            .await
            .map_err(io::Error::other)?
    }
}

/// A name as a relative path beneath the directory, or why not. The
/// confinement itself is cap-std's; these are the clear messages for the
/// obvious cases.
fn check_name(name: &str) -> Result<PathBuf, Status> {
    let refuse = |why: &str| {
        Err(Status::invalid_argument(format!(
            "file name {name:?} refused: {why}"
        )))
    };
    if name.is_empty() {
        return refuse("it is empty");
    }
    if name.len() > 1024 || name.contains('\0') {
        return refuse("it is over 1024 bytes or holds a NUL");
    }
    let path = Path::new(name);
    let mut parts = 0;
    for component in path.components() {
        match component {
            Component::Normal(part) => {
                if part.to_string_lossy().starts_with('.') {
                    return refuse("names starting with '.' are hidden (and temporary files)");
                }
                parts += 1;
            }
            Component::CurDir => {}
            Component::ParentDir => return refuse("'..' would leave the served directory"),
            Component::RootDir | Component::Prefix(_) => {
                return refuse("absolute paths would leave the served directory")
            }
        }
    }
    if parts == 0 {
        return refuse("it names no file");
    }
    Ok(path.to_path_buf())
}

/// An I/O error on `name` as the status the caller sees.
fn io_status(name: &str, e: io::Error) -> Status {
    // cap-std's refusal of a path that leads out (a symlink, say).
    let escapes = e.to_string().contains("outside of the filesystem");
    match e.kind() {
        _ if escapes => Status::permission_denied(format!(
            "file name {name:?} refused: it leads outside the served directory"
        )),
        io::ErrorKind::NotFound => Status::not_found(format!("no file {name:?}")),
        io::ErrorKind::PermissionDenied => {
            Status::permission_denied(format!("file {name:?}: permission denied"))
        }
        _ => Status::internal(format!("file {name:?}: {e}")),
    }
}

/// Removes an upload's temporary file unless the upload completed.
struct TempFile {
    dir: Arc<Dir>,
    path: Option<PathBuf>,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            // One unlink, on whatever thread drops the upload: an upload
            // cancelled mid-way leaves nothing behind.
            match self.dir.remove_file(&path) {
                Ok(()) => debug!(path = %path.display(), "removed unfinished upload"),
                Err(e) => {
                    debug!(path = %path.display(), error = %e, "could not remove unfinished upload")
                }
            }
        }
    }
}

impl Files for FileStore {
    async fn upload(
        &self,
        name: String,
        mut data: Streaming<UploadPiece>,
    ) -> Result<Stored, Status> {
        let path = check_name(&name)?;
        let file_name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let linked = {
            let path = path.clone();
            self.blocking(move |dir| match dir.symlink_metadata(&path) {
                Ok(meta) => Ok(meta.file_type().is_symlink()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
                Err(e) => Err(e),
            })
            .await
        };
        // Renaming over a link would replace the link, not write through
        // it; refused all the same, so a link is never silently swapped.
        if linked.map_err(|e| io_status(&name, e))? {
            return Err(Status::permission_denied(format!(
                "file name {name:?} refused: it is a symbolic link (it may lead outside the served directory); uploads do not replace links"
            )));
        }
        let temp = path.with_file_name(format!(".{file_name}.{:016x}.part", random()));
        let open = {
            let temp = temp.clone();
            self.blocking(move |dir| {
                let mut options = OpenOptions::new();
                options.write(true).create_new(true);
                dir.open_with(&temp, &options)
            })
            .await
        };
        let file = open.map_err(|e| io_status(&name, e))?;
        let mut guard = TempFile {
            dir: self.dir.clone(),
            path: Some(temp.clone()),
        };
        let mut file = tokio::fs::File::from_std(file.into_std());
        let mut hash = Sha256::default();
        let mut size = 0u64;
        let sha256 = loop {
            match data.message().await? {
                Some(UploadPiece::Data(bytes)) => {
                    size += bytes.len() as u64;
                    if size > self.max_file {
                        return Err(Status::resource_exhausted(format!(
                            "upload of {name:?} passes the {}-byte limit; nothing stored",
                            self.max_file
                        )));
                    }
                    hash.update(&bytes);
                    file.write_all(&bytes)
                        .await
                        .map_err(|e| io_status(&name, e))?;
                }
                Some(UploadPiece::Done { sha256 }) => break sha256,
                None => {
                    return Err(Status::aborted(format!(
                        "upload of {name:?} ended before its checksum; nothing stored"
                    )))
                }
            }
        };
        if data.message().await?.is_some() {
            return Err(Status::invalid_argument(format!(
                "upload of {name:?} sent data after its checksum; nothing stored"
            )));
        }
        let ours = hash.finish();
        if ours != sha256 {
            return Err(Status::data_loss(format!(
                "upload of {name:?}: SHA-256 {} received, {} sent; nothing stored",
                rpc_core::files::hex(&ours),
                rpc_core::files::hex(&sha256)
            )));
        }
        file.flush().await.map_err(|e| io_status(&name, e))?;
        file.sync_all().await.map_err(|e| io_status(&name, e))?;
        drop(file);
        let renamed = {
            let (temp, path) = (temp.clone(), path.clone());
            self.blocking(move |dir| dir.rename(&temp, dir, &path))
                .await
        };
        renamed.map_err(|e| io_status(&name, e))?;
        guard.path = None;
        info!(%name, size, "stored upload");
        Ok(Stored { name, size, sha256 })
    }

    async fn download(
        &self,
        name: String,
        offset: u64,
    ) -> Result<ServerStream<DownloadPiece>, Status> {
        let path = check_name(&name)?;
        let opened = self
            .blocking(move |dir| {
                let file = dir.open(&path)?;
                let meta = file.metadata()?;
                Ok((file, meta.is_file(), meta.len()))
            })
            .await;
        let (file, is_file, size) = opened.map_err(|e| io_status(&name, e))?;
        if !is_file {
            return Err(Status::invalid_argument(format!("{name:?} is not a file")));
        }
        if offset > size {
            return Err(Status::out_of_range(format!(
                "offset {offset} is past the end of {name:?} ({size} bytes)"
            )));
        }
        let file = tokio::fs::File::from_std(file.into_std());
        let state = Download {
            name,
            file,
            hash: Sha256::default(),
            offset,
            read: 0,
            done: false,
            buf: vec![0u8; PIECE],
        };
        Ok(ServerStream::new(
            futures_util::stream::unfold(state, Download::next).boxed(),
        ))
    }

    async fn list(&self) -> Result<Vec<FileEntry>, Status> {
        let listed = self
            .blocking(|dir| {
                let mut entries = Vec::new();
                for entry in dir.entries()? {
                    let entry = entry?;
                    let name = entry.file_name().to_string_lossy().into_owned();
                    let meta = entry.metadata()?;
                    if meta.is_file() && !name.starts_with('.') {
                        entries.push(FileEntry {
                            name,
                            size: meta.len(),
                        });
                    }
                }
                entries.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(entries)
            })
            .await;
        listed.map_err(|e| io_status(".", e))
    }
}

/// A download in progress.
struct Download {
    name: String,
    file: tokio::fs::File,
    hash: Sha256,
    /// Bytes before this are hashed, not sent.
    offset: u64,
    /// Bytes read so far.
    read: u64,
    done: bool,
    buf: Vec<u8>,
}

impl Download {
    async fn next(mut self) -> Option<(Result<DownloadPiece, Status>, Download)> {
        if self.done {
            return None;
        }
        loop {
            // Up to the offset the bytes are only hashed; after it, one piece.
            let want = match self.offset.checked_sub(self.read) {
                Some(before) if before > 0 => before.min(self.buf.len() as u64) as usize,
                _ => self.buf.len(),
            };
            let n = match self.file.read(&mut self.buf[..want]).await {
                Ok(n) => n,
                Err(e) => {
                    self.done = true;
                    let status = io_status(&self.name, e);
                    return Some((Err(status), self));
                }
            };
            if n == 0 {
                self.done = true;
                let hash = std::mem::take(&mut self.hash);
                let piece = DownloadPiece::Done {
                    size: self.read,
                    sha256: hash.finish(),
                };
                return Some((Ok(piece), self));
            }
            self.hash.update(&self.buf[..n]);
            let before = self.read;
            self.read += n as u64;
            if before >= self.offset {
                let piece = DownloadPiece::Data(Bytes::copy_from_slice(&self.buf[..n]));
                return Some((Ok(piece), self));
            }
        }
    }
}

/// A random suffix for temporary names (they are also created with
/// `create_new`, so a clash fails rather than overwrites).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_would_leave_the_directory_are_refused_by_name_first() {
        for (name, why) in [
            ("../x", "'..'"),
            ("a/../../x", "'..'"),
            ("/etc/passwd", "absolute"),
            ("", "empty"),
            (".hidden", "hidden"),
            ("dir/.x.part", "hidden"),
            (".", "names no file"),
        ] {
            let e = check_name(name).unwrap_err();
            assert!(e.message.contains(why), "{name:?}: {e}");
        }
        assert_eq!(check_name("a/b.txt").unwrap(), PathBuf::from("a/b.txt"));
        assert_eq!(check_name("./b").unwrap(), PathBuf::from("./b"));
    }
}
