//! A frame body behind a correct length prefix (so every input reaches body
//! decoding), delivered in two pieces cut where the first byte says: the
//! decoder returns the frame or a codec error, never panics, and a frame it
//! returns re-encodes to bytes that decode to the same frame (not always
//! the same bytes: bincode also reads integers written in a longer form).

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use rpc_core::{Error, FrameCodec};
use tokio_util::codec::{Decoder, Encoder};

fuzz_target!(|data: &[u8]| {
    let Some((&cut, body)) = data.split_first() else {
        return;
    };
    let mut wire = Vec::with_capacity(body.len() + 4);
    wire.extend_from_slice(&(body.len() as u32).to_be_bytes());
    wire.extend_from_slice(body);
    let cut = usize::from(cut) % (wire.len() + 1);
    let mut codec = FrameCodec::new(1 << 20, 1 << 20);
    let mut src = BytesMut::from(&wire[..cut]);
    let early = codec.decode(&mut src);
    assert!(matches!(early, Ok(None)) || cut == wire.len(), "{early:?}");
    src.extend_from_slice(&wire[cut..]);
    let decoded = if cut == wire.len() { early } else { codec.decode(&mut src) };
    match decoded {
        Ok(Some(frame)) => {
            let mut again = BytesMut::new();
            let mut codec = FrameCodec::new(1 << 20, 1 << 20);
            codec.encode(frame.clone(), &mut again).unwrap();
            assert_eq!(codec.decode(&mut again).unwrap(), Some(frame));
        }
        Ok(None) => panic!("a complete frame was not decoded"),
        Err(Error::Codec(_)) => {}
        Err(e) => panic!("not a body error: {e}"),
    }
});
