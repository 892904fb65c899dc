use super::*;

#[test]
fn a_lone_byte_string_decodes_as_a_slice_with_decodes_result() {
    for size in [0usize, 1, 250, 251, 65_535, 65_536, 70_000] {
        let payload = Bytes::from(vec![3u8; size]);
        let wire = encode(&(payload.clone(),), usize::MAX).unwrap();
        let (sliced,): (Bytes,) = decode_owned(&wire, wire.len(), DEFAULT_MAX_DEPTH).unwrap();
        let single: Bytes = decode_owned(&wire, wire.len(), DEFAULT_MAX_DEPTH).unwrap();
        let (copied,): (Bytes,) = decode(&wire, wire.len(), DEFAULT_MAX_DEPTH).unwrap();
        assert_eq!(sliced, copied, "{size} bytes");
        assert_eq!(single, copied, "{size} bytes");
        if size > 0 {
            // A slice of the frame, not a copy.
            let frame = wire.as_ptr_range();
            assert!(frame.contains(&sliced.as_ptr()), "{size} bytes were copied");
        }
    }
}

#[test]
fn malformed_byte_strings_fail_as_decode_fails() {
    let good = encode(&Bytes::from_static(b"hello"), usize::MAX).unwrap();
    let mut trailing = BytesMut::from(&good[..]);
    trailing.put_u8(0);
    // Length 5 written in the 3-byte form: not what bincode writes.
    let long_form = Bytes::from_static(&[251, 5, 0, b'h', b'e', b'l', b'l', b'o']);
    let cases = [
        good.slice(..good.len() - 1),
        trailing.freeze(),
        Bytes::from_static(&[252, 1]),
        Bytes::from_static(&[255, 1, 2]),
        long_form,
        Bytes::new(),
    ];
    for case in cases {
        let fast =
            decode_owned::<Bytes>(&case, case.len(), DEFAULT_MAX_DEPTH).map_err(|e| e.to_string());
        let slow = decode::<Bytes>(&case, case.len(), DEFAULT_MAX_DEPTH).map_err(|e| e.to_string());
        assert_eq!(fast, slow, "{case:?}");
    }
    // Over the limit: refused like decode refuses it.
    let err = decode_owned::<Bytes>(&good, good.len() - 1, DEFAULT_MAX_DEPTH).unwrap_err();
    assert!(err.is_size_limit(), "{err}");
}

fn test_pool() -> &'static pool::Pool {
    Box::leak(Box::new(pool::Pool::new()))
}

#[test]
fn a_large_value_is_encoded_into_a_kept_buffer_and_given_back() {
    let pool = test_pool();
    let value = (7u8, vec![1u8; 300_000]);
    let first = encode_pooled(&value, usize::MAX, pool).unwrap();
    let plain = {
        let mut buf = BytesMut::new();
        encode_into(&value, usize::MAX, &mut buf).unwrap();
        buf
    };
    assert_eq!(&first[..], &plain[..]);
    let (tag, body): (u8, Vec<u8>) = decode(&first, usize::MAX, DEFAULT_MAX_DEPTH).unwrap();
    assert_eq!((tag, body), value);
    // Kept while any slice of it lives; back in the pool after.
    let at = first.as_ptr();
    let slice = first.slice(10..20);
    drop(first);
    assert!(pool.kept().is_empty());
    drop(slice);
    assert_eq!(pool.kept().len(), 1);
    // The next large value is written over the same memory.
    let second = encode_pooled(&(8u8, vec![2u8; 200_000]), usize::MAX, pool).unwrap();
    assert_eq!(second.as_ptr(), at);
    assert!(pool.kept().is_empty());
    // Small values never touch the pool.
    drop(encode_pooled(&vec![0u8; 1000], usize::MAX, pool).unwrap());
    drop(second);
    assert_eq!(pool.kept().len(), 1);
}

#[test]
fn round_trip_borrows_str() {
    let bytes = encode(&("hello", 7u32), 1024).unwrap();
    let (s, n): (&str, u32) = decode(&bytes, 1024, DEFAULT_MAX_DEPTH).unwrap();
    assert_eq!((s, n), ("hello", 7));
    assert_eq!(encoded_len(&("hello", 7u32), 1024).unwrap(), bytes.len());
}

#[test]
fn trailing_bytes_are_rejected() {
    let mut bytes = encode(&5u32, 64).unwrap().to_vec();
    bytes.push(0);
    let err = decode::<u32>(&bytes, 64, DEFAULT_MAX_DEPTH).unwrap_err();
    assert_eq!(err.to_string(), "1 bytes left over after the message");
}

#[test]
fn decode_enforces_the_limit() {
    let big = "x".repeat(2000);
    let bytes = encode(&big, 4096).unwrap();
    let err = decode::<String>(&bytes, 1024, DEFAULT_MAX_DEPTH).unwrap_err();
    assert!(err.is_size_limit(), "{err:?}");
}

#[test]
fn forged_length_prefix_errors_without_allocating() {
    // varint marker 253 = a u64 follows: a length of 2^40 bytes, then
    // nothing. Either the limit or the missing input stops the decode;
    // the test would abort on a 1 TiB allocation.
    let mut forged = vec![253u8];
    forged.extend_from_slice(&(1u64 << 40).to_le_bytes());
    let err = decode::<String>(&forged, 1024, DEFAULT_MAX_DEPTH).unwrap_err();
    assert!(err.is_size_limit(), "{err}");
    // A sequence reads element by element (serde caps what it reserves
    // up front) and runs out of input.
    let err = decode::<Vec<u8>>(&forged, 1024, DEFAULT_MAX_DEPTH).unwrap_err();
    assert!(
        err.to_string().contains("failed to fill whole buffer"),
        "{err}"
    );
    // Within the limit, the missing bytes stop a string.
    let mut short = vec![100u8];
    short.extend_from_slice(b"abc");
    let err = decode::<String>(&short, 1024, DEFAULT_MAX_DEPTH).unwrap_err();
    assert!(
        err.to_string().contains("needs 100 more bytes, 3 left"),
        "{err}"
    );
}

#[test]
fn size_errors_say_which_size() {
    // Arguments sent as (i64,) read as (String,): the string's length
    // runs past what arrived.
    let sent = encode(&(300i64,), 64).unwrap();
    let err = decode::<(String,)>(&sent, sent.len(), DEFAULT_MAX_DEPTH).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("the value needs more than the {} bytes that arrived (do both sides agree on the types?)", sent.len())
    );
    let err = encode(&vec![0u8; 100], 10).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("larger than the frame limit of 10 bytes (raise max_frame"),
        "{err}"
    );
}

#[test]
fn encode_past_limit_fails_and_leaves_buffer() {
    let mut buf = BytesMut::from(&b"ab"[..]);
    let big = vec![1u8; 100];
    assert!(encode_into(&big, 10, &mut buf).unwrap_err().is_size_limit());
    assert_eq!(&buf[..], b"ab");
}

/// A recursive type, as a user's AST would be.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Expr {
    Lit(i64),
    Neg(Box<Expr>),
    Pair(Vec<Expr>),
    Opt(Option<Box<Expr>>),
}

/// `Neg` nested `depth` times around a literal, as bincode writes it
/// (variant 1, then the inner value), built without recursion.
fn nested_neg(depth: usize) -> Vec<u8> {
    let mut wire = vec![1u8; depth];
    wire.extend_from_slice(&[0, 14]); // Lit(7): variant 0, zigzag 7
    wire
}

#[test]
fn nesting_up_to_the_limit_decodes_and_deeper_is_refused() {
    // Expr levels count one each.
    let ok: Expr = decode(&nested_neg(9), 1 << 20, 10).unwrap();
    let mut e = &ok;
    let mut n = 0;
    while let Expr::Neg(inner) = e {
        e = inner;
        n += 1;
    }
    assert_eq!((n, e), (9, &Expr::Lit(7)));
    let err = decode::<Expr>(&nested_neg(10), 1 << 20, 10).unwrap_err();
    assert!(err.is_depth_limit(), "{err}");
    assert_eq!(err.to_string(), "nesting deeper than 10 levels (max depth)");
    // Sequences, options and tuples count too.
    let wrapped = encode(
        &(Expr::Pair(vec![Expr::Opt(Some(Box::new(Expr::Lit(1))))]),),
        1024,
    )
    .unwrap();
    // tuple, Pair, its Vec, Opt, Some, Lit: 6 levels.
    assert!(decode::<(Expr,)>(&wrapped, 1024, 6).is_ok());
    assert!(decode::<(Expr,)>(&wrapped, 1024, 5)
        .unwrap_err()
        .is_depth_limit());
    assert!(decode_owned::<(Expr,)>(&wrapped, 1024, 5)
        .unwrap_err()
        .is_depth_limit());
}

#[test]
fn a_million_levels_are_refused_without_overflowing_the_stack() {
    let wire = nested_neg(1_000_000);
    let err = decode::<Expr>(&wire, wire.len(), DEFAULT_MAX_DEPTH).unwrap_err();
    assert!(err.is_depth_limit(), "{err}");
    assert!(err.to_string().contains("nesting deeper than 128"), "{err}");
    let err = decode_prefix::<Expr>(&wire, wire.len(), DEFAULT_MAX_DEPTH).unwrap_err();
    assert!(err.is_depth_limit(), "{err}");
}

#[test]
fn the_depth_limit_changes_no_other_result() {
    // Borrowed strings still borrow, errors other than depth keep
    // their text, and flat values decode as before.
    let bytes = encode(&("hi", vec![1u16, 2], Some(3u8)), 1024).unwrap();
    let got: (&str, Vec<u16>, Option<u8>) = decode(&bytes, 1024, 3).unwrap();
    assert_eq!(got, ("hi", vec![1, 2], Some(3)));
    let err = decode::<Expr>(&[9], 16, DEFAULT_MAX_DEPTH).unwrap_err();
    assert!(!err.is_depth_limit());
    assert!(err.to_string().contains("variant index"), "{err}");
}

#[test]
fn a_forged_length_of_zero_sized_elements_is_refused_at_once() {
    // 2^60 units in 9 bytes: without a bound, a loop of 2^60 turns.
    let mut forged = vec![0xfd];
    forged.extend_from_slice(&(1u64 << 60).to_le_bytes());
    let started = std::time::Instant::now();
    let err = decode::<Vec<()>>(&forged, 1 << 20, DEFAULT_MAX_DEPTH).unwrap_err();
    assert!(err.to_string().contains("more elements"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    // As a map of units too.
    let err = decode::<std::collections::BTreeMap<(), ()>>(&forged, 1 << 20, DEFAULT_MAX_DEPTH)
        .unwrap_err();
    assert!(err.to_string().contains("more elements"), "{err}");
    // Honest values are far from the bound.
    let units = encode(&vec![(); 1000], 64).unwrap();
    assert_eq!(
        decode::<Vec<()>>(&units, 64, DEFAULT_MAX_DEPTH)
            .unwrap()
            .len(),
        1000
    );
    let bytes: Vec<u16> = (0..5000).collect();
    let encoded = encode(&bytes, 1 << 20).unwrap();
    assert_eq!(
        decode::<Vec<u16>>(&encoded, 1 << 20, DEFAULT_MAX_DEPTH).unwrap(),
        bytes
    );
}

#[test]
fn encoded_is_its_bytes_unchanged() {
    let bytes = encode(&(300u32, -5i64, "text", Some(1u8)), 64).unwrap();
    assert_eq!(encode(&Encoded(bytes.clone()), 64).unwrap(), bytes);
    assert_eq!(
        encoded_len(&Encoded(bytes.clone()), 64).unwrap(),
        bytes.len()
    );
    assert!(encode(&Encoded(bytes.clone()), 2)
        .unwrap_err()
        .is_size_limit());
}

#[test]
fn undecoded_is_the_whole_message_and_nothing_inside_one() {
    let bytes = encode(&(7u32, "seven"), 64).unwrap();
    let whole: Undecoded = decode_owned(&bytes, 64, DEFAULT_MAX_DEPTH).unwrap();
    assert_eq!(whole.0, bytes);
    // Over the limit: refused like any message.
    assert!(decode_owned::<Undecoded>(&bytes, 2, DEFAULT_MAX_DEPTH).is_err());
    assert!(decode_owned::<(Undecoded,)>(&bytes, 64, DEFAULT_MAX_DEPTH).is_err());
    // A seed reads it later, under the same nesting limit.
    let (n, s): (u32, String) = decode_seed(PhantomData, &whole.0, 64, DEFAULT_MAX_DEPTH).unwrap();
    assert_eq!((n, s.as_str()), (7, "seven"));
    assert!(decode_seed(PhantomData::<(u32, String)>, &whole.0, 64, 0)
        .unwrap_err()
        .is_depth_limit());
}
