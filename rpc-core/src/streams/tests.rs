//! The stream table's rules and bookkeeping, without a connection.

use super::*;
use futures_util::task::noop_waker;

fn cx_poll<T>(f: impl FnOnce(&mut Context<'_>) -> T) -> T {
    let waker = noop_waker();
    let mut cx = Context::from_waker(&waker);
    f(&mut cx)
}

fn item(table: &StreamTable, id: u64) -> Poll<Option<Result<Bytes, StreamEnd>>> {
    cx_poll(|cx| table.poll_item(id, cx, None).0)
}

#[test]
fn pieces_become_items_in_order_and_end_ends() {
    let t = StreamTable::new(Instant::now());
    t.open(1, true, true, Instant::now());
    t.on_data(1, true, Bytes::from_static(b"he"), true, 100)
        .unwrap();
    assert!(item(&t, 1).is_pending(), "half an item is no item");
    t.on_data(1, false, Bytes::from_static(b"llo"), true, 100)
        .unwrap();
    t.on_data(1, false, Bytes::new(), true, 100).unwrap();
    assert_eq!(
        item(&t, 1),
        Poll::Ready(Some(Ok(Bytes::from_static(b"hello"))))
    );
    assert_eq!(
        item(&t, 1),
        Poll::Ready(Some(Ok(Bytes::new()))),
        "an empty item"
    );
    t.on_end(1, true).unwrap();
    assert_eq!(item(&t, 1), Poll::Ready(None));
}

#[test]
fn each_broken_rule_is_a_violation_naming_it() {
    let t = StreamTable::new(Instant::now());
    t.open(1, true, true, Instant::now());
    t.open(2, false, true, Instant::now());
    let data = |id, opened| t.on_data(id, false, Bytes::from_static(b"x"), opened, 100);
    assert!(data(9, false).unwrap_err().contains("never opened"));
    assert!(data(2, true).unwrap_err().contains("sends no stream"));
    t.on_end(1, true).unwrap();
    assert!(data(1, true).unwrap_err().contains("after its End"));
    assert!(t.on_end(1, true).unwrap_err().contains("second End"));
    assert!(t.on_end(2, true).unwrap_err().contains("sends no stream"));
    assert!(t.on_end(9, false).unwrap_err().contains("never opened"));
    assert!(t.on_reset(9, false).unwrap_err().contains("never opened"));
    assert!(t
        .on_credit(9, 1, false)
        .unwrap_err()
        .contains("never opened"));
    assert!(t
        .on_credit(0, MAX_CREDIT, true)
        .unwrap_err()
        .contains("beyond"));
    // A piece over the item limit.
    t.open(3, true, false, Instant::now());
    let big = Bytes::from(vec![0u8; 101]);
    assert!(t
        .on_data(3, false, big, true, 100)
        .unwrap_err()
        .contains("limit"));
    // Late frames for a stream that is gone are fine.
    assert!(data(7, true).is_ok());
    assert!(t.on_end(7, true).is_ok());
    assert!(t.on_credit(7, 10, true).is_ok());
    assert!(t.on_reset(7, true).is_ok());
}

#[test]
fn data_beyond_the_streams_credit_is_a_violation() {
    let t = StreamTable::new(Instant::now());
    t.open(1, true, false, Instant::now());
    let piece = Bytes::from(vec![0u8; CHUNK]);
    let per_piece = CHUNK as u64 + PIECE_COST;
    let fits = STREAM_WINDOW / per_piece;
    for _ in 0..fits {
        t.on_data(1, false, piece.clone(), true, CHUNK).unwrap();
    }
    let e = t.on_data(1, false, piece.clone(), true, CHUNK).unwrap_err();
    assert!(e.contains("beyond its credit"), "{e}");
    // Taking the items gives credit back, in one batch at half the window.
    let mut granted = 0;
    for _ in 0..fits {
        assert!(matches!(item(&t, 1), Poll::Ready(Some(Ok(_)))));
        for f in t.take_control() {
            if let Frame::Credit { id: 1, bytes } = f {
                granted += bytes;
            }
        }
    }
    assert!(granted >= STREAM_WINDOW / 2, "{granted}");
}

#[test]
fn the_connections_credit_bounds_all_streams_together() {
    let t = StreamTable::new(Instant::now());
    let piece = Bytes::from(vec![0u8; CHUNK]);
    let mut id = 0;
    let mut sent = 0u64;
    let e = loop {
        id += 1;
        t.open(id, true, false, Instant::now());
        let mut result = Ok(());
        for _ in 0..8 {
            result = t.on_data(id, false, piece.clone(), true, CHUNK);
            if result.is_err() {
                break;
            }
            sent += CHUNK as u64 + PIECE_COST;
        }
        if let Err(e) = result {
            break e;
        }
        assert!(id < 100);
    };
    assert!(e.contains("connection's credit"), "{e}");
    assert!(sent <= CONNECTION_WINDOW);
    assert!(sent + CHUNK as u64 + PIECE_COST > CONNECTION_WINDOW);
}

#[test]
fn a_sender_queues_one_piece_at_a_time_within_credit() {
    let t = StreamTable::new(Instant::now());
    t.open(1, false, true, Instant::now());
    let send = |want| cx_poll(|cx| t.poll_send(1, want, cx));
    assert_eq!(send(1 << 20), Poll::Ready(Ok(CHUNK)));
    assert!(send(10).is_pending(), "one piece queued already");
    t.taken(1);
    let mut total = CHUNK as u64 + PIECE_COST;
    loop {
        match send(CHUNK) {
            Poll::Ready(Ok(n)) => {
                total += n as u64 + PIECE_COST;
                t.taken(1);
            }
            Poll::Pending => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(total <= STREAM_WINDOW && total > STREAM_WINDOW - CHUNK as u64 - 2 * PIECE_COST);
    t.on_credit(1, 1000, true).unwrap();
    assert!(matches!(send(CHUNK), Poll::Ready(Ok(n)) if n > 0 && n <= 1000));
    t.taken(1);
    t.on_reset(1, true).unwrap();
    assert_eq!(send(1), Poll::Ready(Err(StreamEnd::Reset)));
    t.close("gone".into());
    assert_eq!(send(1), Poll::Ready(Err(StreamEnd::Closed("gone".into()))));
}

#[test]
fn a_dropped_receiver_resets_and_returns_what_it_held() {
    let t = StreamTable::new(Instant::now());
    t.open(1, true, false, Instant::now());
    for _ in 0..10 {
        t.on_data(1, false, Bytes::from(vec![0u8; CHUNK]), true, CHUNK)
            .unwrap();
    }
    assert!(t.buffered() > 10 * CHUNK as u64);
    assert!(t.drop_recv(1, true));
    let frames = t.take_control();
    assert!(frames.contains(&Frame::Reset { id: 1 }), "{frames:?}");
    assert_eq!(t.buffered(), 0);
    assert_eq!(t.len(), 0);
    // What still comes is dropped and its connection credit returned.
    t.on_data(1, false, Bytes::from(vec![0u8; CHUNK]), true, CHUNK)
        .unwrap();
    assert_eq!(t.buffered(), 0);
}
