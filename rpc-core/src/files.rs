//! The file service's contract (`srpc.files`-style transfer, served by
//! `rpc-server --files DIR`): the [`Files`] trait, its pieces, and the
//! SHA-256 both sides compute. Here because the server implements it
//! (`rpc-server`'s `files.rs`, confined to its directory) and the CLI
//! calls it (`rpc-client upload / download / files`), as `health.rs` is.
//!
//! ```text
//! upload(name, Data.. Done{sha256})  ──►  temp file, checked, renamed into place
//! download(name, offset)             ◄──  Data.. Done{size, sha256 of the whole file}
//! ```
//!
//! Not here: where files live and how names are confined (the server).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::Status;
use crate::streaming::{ServerStream, Streaming};
use crate::streams::CHUNK;

/// Bytes of file data per piece: 64 KiB, which with its few bytes of
/// encoding travels as one stream `Data` frame (see `MAX_PIECE`).
pub const PIECE: usize = CHUNK;

/// One item of an upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadPiece {
    /// The next bytes of the file.
    Data(Bytes),
    /// The end: the SHA-256 of everything sent. The file is stored only if
    /// the server computed the same.
    Done {
        /// SHA-256 of the file.
        sha256: [u8; 32],
    },
}

/// One item of a download.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DownloadPiece {
    /// The next bytes of the file.
    Data(Bytes),
    /// The end: the whole file's size and SHA-256 (from byte 0, whatever
    /// the offset asked for), to check a resumed download against.
    Done {
        /// The file's size in bytes.
        size: u64,
        /// SHA-256 of the whole file.
        sha256: [u8; 32],
    },
}

/// A file as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// Its name under the served directory.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its SHA-256.
    pub sha256: [u8; 32],
}

/// One listed file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Its name under the served directory.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
}

/// File transfer confined to one directory.
#[rpc_macros::service(crate = crate)]
pub trait Files {
    /// Stores the caller's pieces as `name` once complete and checked;
    /// until then nothing exists under that name.
    async fn upload(&self, name: String, data: Streaming<UploadPiece>) -> Result<Stored, Status>;
    /// The bytes of `name` from `offset` on, then its size and SHA-256.
    async fn download(
        &self,
        name: String,
        offset: u64,
    ) -> Result<ServerStream<DownloadPiece>, Status>;
    /// The files in the directory (not hidden ones), by name.
    async fn list(&self) -> Result<Vec<FileEntry>, Status>;
}

/// SHA-256 computed as bytes go by.
pub struct Sha256(aws_lc_rs::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Sha256(aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256))
    }
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sha256")
    }
}

impl Sha256 {
    /// Adds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The digest of everything added.
    pub fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

/// A digest as lowercase hex, as `sha256sum` prints it.
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_standard_vector_and_pieces_fit_one_data_frame() {
        let mut h = Sha256::default();
        h.update(b"ab");
        h.update(b"c");
        assert_eq!(
            hex(&h.finish()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let piece = UploadPiece::Data(Bytes::from(vec![0u8; PIECE]));
        let encoded = crate::codec::encode(&piece, usize::MAX).unwrap();
        assert!(
            encoded.len() <= crate::streams::MAX_PIECE,
            "{}",
            encoded.len()
        );
    }
}
