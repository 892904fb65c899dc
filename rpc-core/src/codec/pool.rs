//! Buffers for large encoded values, used again instead of freed.
//!
//! A large argument or reply lives only until the writer has copied it into
//! the write buffer; a large frame read (see `reader.rs`) until its body is
//! dropped. Freed, it goes back to glibc, which returns such memory
//! to the kernel and takes page faults to get it again. Kept here, it is
//! written over instead.
//!
//! The pool is bounded: at most [`KEPT`] buffers and [`KEPT_BYTES`] in all,
//! none larger than [`MAX_BUFFER`]; a buffer beyond that is freed as usual.
//! A process that once made large calls keeps up to that much memory.

use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;

/// Values encoding to fewer bytes than this are not pooled.
pub(crate) const MIN_BUFFER: usize = 64 * 1024;
/// The largest buffer kept.
pub(crate) const MAX_BUFFER: usize = 8 * 1024 * 1024;
/// At most this many buffers are kept.
pub(crate) const KEPT: usize = 8;
/// At most this many bytes are kept in all.
pub(crate) const KEPT_BYTES: usize = 16 * 1024 * 1024;

/// The process's pool.
pub(crate) static POOL: Pool = Pool::new();

pub(crate) struct Pool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    pub(crate) const fn new() -> Self {
        Pool {
            free: Mutex::new(Vec::new()),
        }
    }

    fn free(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        // push and swap_remove only: a poisoned list is still consistent.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty buffer with room for `len` bytes: the smallest kept one
    /// that is large enough, else a new one.
    pub(crate) fn take(&self, len: usize) -> Vec<u8> {
        let kept = {
            let mut free = self.free();
            let fit = free
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .map(|(i, _)| i);
            fit.map(|i| free.swap_remove(i))
        };
        match kept {
            Some(mut buf) => {
                buf.clear();
                buf
            }
            // Rounded up, so that buffers for values of about one size
            // (an encoded reply, and the frame that carries it) fit
            // each other's uses.
            None => Vec::with_capacity(len.checked_next_multiple_of(MIN_BUFFER).unwrap_or(len)),
        }
    }

    /// Keeps `buf`, or frees it when it is too large or the pool full.
    fn give_back(&self, buf: Vec<u8>) {
        if buf.capacity() > MAX_BUFFER {
            return;
        }
        let mut free = self.free();
        let held: usize = free.iter().map(Vec::capacity).sum();
        if free.len() < KEPT && held + buf.capacity() <= KEPT_BYTES {
            free.push(buf);
        }
    }

    /// `buf` as [`Bytes`]; it comes back here when the last slice of
    /// it is dropped.
    pub(crate) fn bytes(&'static self, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled { buf, pool: self })
    }

    #[cfg(test)]
    pub(crate) fn kept(&self) -> Vec<usize> {
        self.free().iter().map(Vec::capacity).collect()
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: &'static Pool,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_pool() -> &'static Pool {
        Box::leak(Box::new(Pool::new()))
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_bounded_buffers() {
        let pool = test_pool();
        // Too large to keep.
        drop(pool.bytes(Vec::with_capacity(MAX_BUFFER + 1)));
        assert!(pool.kept().is_empty());
        // Count bound.
        let many: Vec<Bytes> = (0..KEPT + 3)
            .map(|_| pool.bytes(pool.take(MIN_BUFFER)))
            .collect();
        drop(many);
        assert_eq!(pool.kept().len(), KEPT);
        // Byte bound.
        let pool = test_pool();
        let big: Vec<Bytes> = (0..3).map(|_| pool.bytes(pool.take(MAX_BUFFER))).collect();
        drop(big);
        let kept = pool.kept();
        assert!(kept.iter().sum::<usize>() <= KEPT_BYTES, "{kept:?}");
        assert_eq!(kept.len(), KEPT_BYTES / MAX_BUFFER);
        // The smallest buffer that fits is taken.
        let pool = test_pool();
        let sizes = [4 * MIN_BUFFER, MIN_BUFFER, 2 * MIN_BUFFER];
        let held: Vec<Bytes> = sizes.iter().map(|&n| pool.bytes(pool.take(n))).collect();
        drop(held);
        let got = pool.take(MIN_BUFFER + 1);
        assert!(got.is_empty());
        assert_eq!(got.capacity(), 2 * MIN_BUFFER);
    }
}
