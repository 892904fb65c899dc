//! The outbound queues: frames on their way to the writer. A connection
//! has two, one for data (requests, responses, cancels) and one for
//! control (`Ping`, `Pong`, `GoAway`), which the writer takes first.
//!
//! Each is a bounded queue, like a channel, but a deque that allocates
//! nothing while empty (a tokio channel's first block is about 2.4 KiB for
//! every connection, idle or not). The writer gives freed places back once
//! per batch rather than once per frame.
//!
//! Not here: the writer that drains them (`writer.rs`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use futures_util::task::AtomicWaker;
use std::task::Poll;
use tokio::sync::Semaphore;

use crate::frame::Frame;

/// Capacity of the control queue (pings, pongs, GoAway).
pub(crate) const CONTROL_QUEUE: usize = 64;

/// Why [`Outbound::try_send`] did not queue a frame.
pub(crate) enum TrySend {
    /// The queue is at capacity; `send` would wait.
    Full,
    /// The writer has stopped.
    Closed,
}

/// One outbound queue (see the module docs).
pub(crate) struct Outbound {
    frames: Mutex<Queue>,
    /// One permit per free place; closed when the writer stops.
    space: Semaphore,
    /// The writer, when it waits for a frame.
    ready: AtomicWaker,
    capacity: usize,
    /// More than `capacity` frames wait; updated under the lock.
    over: AtomicBool,
    /// Frames queued; lets the writer see an empty queue without the lock.
    len: AtomicUsize,
    /// Places the writer has freed but not yet given back (it gives them
    /// back once per batch: each `add_permits` takes the semaphore's lock).
    held: AtomicUsize,
    /// The connection is closing: the writer writes what is queued and
    /// stops.
    stopped: AtomicBool,
}

#[derive(Default)]
struct Queue {
    frames: VecDeque<Frame>,
    closed: bool,
    /// Frames queued by `send_now` without a permit; popping one of them
    /// returns no permit.
    unpermitted: usize,
}

impl Outbound {
    pub(crate) fn new(capacity: usize) -> Self {
        let capacity = capacity.clamp(1, Semaphore::MAX_PERMITS);
        Outbound {
            frames: Mutex::new(Queue::default()),
            space: Semaphore::new(capacity),
            ready: AtomicWaker::new(),
            capacity,
            over: AtomicBool::new(false),
            len: AtomicUsize::new(0),
            held: AtomicUsize::new(0),
            stopped: AtomicBool::new(false),
        }
    }

    fn frames(&self) -> MutexGuard<'_, Queue> {
        // push_back/pop_front only: a poisoned deque is still consistent.
        self.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `frame`; `permitted` says whether a place was taken for it,
    /// `wake` whether to wake the writer.
    fn push(&self, frame: Frame, permitted: bool, wake: bool) -> Result<(), Frame> {
        {
            let mut q = self.frames();
            if q.closed {
                return Err(frame);
            }
            q.frames.push_back(frame);
            if !permitted {
                q.unpermitted += 1;
            }
            self.over
                .store(q.frames.len() > self.capacity, Ordering::Relaxed);
            self.len.store(q.frames.len(), Ordering::Release);
        }
        if wake {
            self.ready.wake();
        }
        Ok(())
    }

    /// Queues `frame` at once, past the capacity if need be: for the
    /// connection's own task, which also runs the writer and so must never
    /// wait for it. That task stops reading while the queue is over
    /// capacity ([`Outbound::over_capacity`]), which bounds the excess.
    ///
    /// The writer is not woken: it looks at the queue each time it is
    /// polled, and the task polls it on its next turn anyway. Waking it
    /// would wake the running task itself, which tokio treats as a yield: it
    /// re-queues the task and wakes the other worker thread to steal it.
    pub(crate) fn send_now(&self, frame: Frame) {
        let permitted = match self.space.try_acquire() {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        };
        let _ = self.push(frame, permitted, false);
    }

    /// More frames wait than the capacity (read on every turn of the
    /// driver's loop, so kept in an atomic rather than behind the lock).
    pub(crate) fn over_capacity(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }

    /// Queues `frame`, waiting for room; gives it back if the writer has
    /// stopped.
    pub(crate) async fn send(&self, frame: Frame) -> Result<(), Frame> {
        match self.space.acquire().await {
            Ok(permit) => {
                permit.forget();
                self.push(frame, true, true)
            }
            Err(_) => Err(frame),
        }
    }

    /// Queues `frame` if there is room now.
    pub(crate) fn try_send(&self, frame: Frame) -> Result<(), TrySend> {
        self.try_push(frame).map_err(|(why, _)| why)
    }

    /// Like [`Outbound::try_send`], giving the frame back when it could not
    /// be queued.
    pub(crate) fn try_push(&self, frame: Frame) -> Result<(), (TrySend, Frame)> {
        match self.space.try_acquire() {
            Ok(permit) => {
                permit.forget();
                self.push(frame, true, true)
                    .map_err(|frame| (TrySend::Closed, frame))
            }
            Err(tokio::sync::TryAcquireError::NoPermits) => Err((TrySend::Full, frame)),
            Err(tokio::sync::TryAcquireError::Closed) => Err((TrySend::Closed, frame)),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len.load(Ordering::Acquire) == 0
    }

    /// The next frame, giving its place back at once.
    pub(crate) fn pop(&self) -> Option<Frame> {
        let frame = self.pop_deferring_release();
        self.release_deferred();
        frame
    }

    /// The next frame; its place is given back by [`Outbound::release_deferred`].
    pub(crate) fn pop_deferring_release(&self) -> Option<Frame> {
        // Only the writer pops, so an empty queue stays empty until a push,
        // and a push wakes the writer (or is made by its own task).
        if self.is_empty() {
            return None;
        }
        let mut q = self.frames();
        let frame = q.frames.pop_front()?;
        self.account_popped(&mut q, 1);
        Some(frame)
    }

    /// Moves up to `max` frames to `out` under one lock; their places are
    /// given back by [`Outbound::release_deferred`]. (Popping them one at a
    /// time took the lock once per frame.)
    pub(crate) fn pop_many_deferring_release(
        &self,
        out: &mut VecDeque<Frame>,
        max: usize,
    ) -> usize {
        if self.is_empty() {
            return 0;
        }
        let mut q = self.frames();
        let n = max.min(q.frames.len());
        out.extend(q.frames.drain(..n));
        self.account_popped(&mut q, n);
        n
    }

    /// Bookkeeping for `n` frames just popped from `q`: the places of the
    /// permitted ones are held for `release_deferred`.
    fn account_popped(&self, q: &mut Queue, n: usize) {
        let unpermitted = n.min(q.unpermitted);
        q.unpermitted -= unpermitted;
        self.held.fetch_add(n - unpermitted, Ordering::Relaxed);
        self.over
            .store(q.frames.len() > self.capacity, Ordering::Relaxed);
        self.len.store(q.frames.len(), Ordering::Release);
    }

    /// Gives back the places of the frames popped since the last call.
    pub(crate) fn release_deferred(&self) {
        let held = self.held.swap(0, Ordering::Relaxed);
        if held > 0 {
            self.space.add_permits(held);
        }
    }

    /// The next frame, or `None` once [`Outbound::stop`] was called and
    /// the queue is empty. Each poll looks at the queue, woken or not.
    pub(crate) async fn next(&self) -> Option<Frame> {
        std::future::poll_fn(|cx| {
            if let Some(frame) = self.pop() {
                return Poll::Ready(Some(frame));
            }
            self.ready.register(cx.waker());
            // A frame queued between the first look and the registration
            // woke nobody: look again.
            match self.pop() {
                Some(frame) => Poll::Ready(Some(frame)),
                None if self.stopped.load(Ordering::Acquire) => Poll::Ready(None),
                None => Poll::Pending,
            }
        })
        .await
    }

    /// Tells the writer to finish: write what is queued, then stop.
    pub(crate) fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
        self.ready.wake();
    }

    /// The writer stopped: senders fail from now on instead of waiting.
    pub(crate) fn close(&self) {
        self.frames().closed = true;
        self.space.close();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;

    /// A waker that counts its wakes.
    pub(crate) struct CountWakes(pub(crate) std::sync::atomic::AtomicUsize);

    impl futures_util::task::ArcWake for CountWakes {
        fn wake_by_ref(me: &Arc<Self>) {
            me.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn ping(nonce: u64) -> Frame {
        Frame::Ping { nonce }
    }

    #[tokio::test]
    async fn the_outbound_queue_is_bounded_ordered_and_fails_once_closed() {
        let q = Arc::new(Outbound::new(2));
        assert!(q.try_send(ping(1)).is_ok());
        assert!(q.send(ping(2)).await.is_ok());
        assert!(matches!(q.try_send(ping(3)), Err(TrySend::Full)));
        // A waiting sender gets in as soon as the writer takes a frame.
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.send(ping(3)).await.is_ok() }
        });
        assert_eq!(q.next().await, Some(ping(1)));
        assert!(waiting.await.unwrap());
        assert_eq!(q.pop(), Some(ping(2)));
        assert_eq!(q.pop(), Some(ping(3)));
        assert_eq!(q.pop(), None);
        // The connection's own replies never wait: past the capacity they
        // are queued all the same, and the queue reports it is over.
        for n in 10..13 {
            q.send_now(ping(n));
        }
        assert!(q.over_capacity());
        assert!(matches!(q.try_send(ping(13)), Err(TrySend::Full)));
        for n in 10..13 {
            assert_eq!(q.pop(), Some(ping(n)));
        }
        assert!(!q.over_capacity());
        // Exactly the capacity is free again: no permit was made up.
        assert!(q.try_send(ping(20)).is_ok());
        assert!(q.try_send(ping(21)).is_ok());
        assert!(matches!(q.try_send(ping(22)), Err(TrySend::Full)));
        assert_eq!(q.pop(), Some(ping(20)));
        assert_eq!(q.pop(), Some(ping(21)));
        q.close();
        assert!(matches!(q.try_send(ping(4)), Err(TrySend::Closed)));
        assert_eq!(q.send(ping(5)).await, Err(ping(5)));
    }

    #[test]
    fn the_writer_gives_places_back_once_per_batch() {
        let q = Outbound::new(2);
        assert!(q.try_send(ping(1)).is_ok());
        assert!(q.try_send(ping(2)).is_ok());
        assert_eq!(q.pop_deferring_release(), Some(ping(1)));
        assert_eq!(q.pop_deferring_release(), Some(ping(2)));
        assert_eq!(q.pop_deferring_release(), None);
        // Popped but not given back: the queue is still full to senders.
        assert!(matches!(q.try_send(ping(3)), Err(TrySend::Full)));
        q.release_deferred();
        assert!(q.try_send(ping(3)).is_ok());
        assert!(q.try_send(ping(4)).is_ok());
        assert!(matches!(q.try_send(ping(5)), Err(TrySend::Full)));
    }

    #[tokio::test]
    async fn a_stopped_queue_gives_what_it_holds_then_ends() {
        let q = Outbound::new(4);
        assert!(q.try_send(ping(1)).is_ok());
        q.stop();
        assert_eq!(q.next().await, Some(ping(1)));
        assert_eq!(q.next().await, None);
    }

    #[test]
    fn the_writer_is_woken_only_from_other_tasks_and_finds_frames_anyway() {
        use std::future::Future;
        let q = Outbound::new(4);
        let wakes = Arc::new(CountWakes(0.into()));
        let waker = futures_util::task::waker(wakes.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let woken = || wakes.0.load(Ordering::SeqCst);

        // A frame the connection task queues wakes nobody, and the
        // writer's next poll takes it.
        let mut next = Box::pin(q.next());
        assert!(next.as_mut().poll(&mut cx).is_pending());
        q.send_now(ping(1));
        assert_eq!(woken(), 0);
        assert_eq!(next.as_mut().poll(&mut cx), Poll::Ready(Some(ping(1))));
        // Frames from other tasks (callers, spawned handlers) wake it.
        let mut next = Box::pin(q.next());
        assert!(next.as_mut().poll(&mut cx).is_pending());
        assert!(q.try_send(ping(2)).is_ok());
        assert_eq!(woken(), 1);
        assert_eq!(next.as_mut().poll(&mut cx), Poll::Ready(Some(ping(2))));
    }

    #[tokio::test]
    async fn the_control_queue_holds_at_most_its_capacity() {
        let q = Outbound::new(CONTROL_QUEUE);
        for n in 0..CONTROL_QUEUE as u64 {
            assert!(q.try_send(ping(n)).is_ok());
        }
        assert!(
            q.try_send(ping(999)).is_err(),
            "a full control queue drops the frame"
        );
        assert_eq!(q.next().await, Some(ping(0)));
        assert!(q.try_send(ping(1000)).is_ok());
    }
}
