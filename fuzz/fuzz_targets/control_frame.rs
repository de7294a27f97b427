//! Control stream decoding: the first input byte picks a chunk size, the rest is a byte stream.
//! Whole-buffer `decode_frame` and chunked `FrameDecoder` must agree message for message and on
//! the error, and every decoded message must re-encode to something that decodes equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_proto::control::{decode_frame, encode_to_vec, FrameDecoder};
use petrel_proto::FRAME_HEADER_LEN;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);

    let mut whole = Vec::new();
    let mut whole_err = None;
    let mut rest = stream;
    loop {
        match decode_frame(rest) {
            Ok(Some((msg, used))) => {
                assert!(used >= FRAME_HEADER_LEN && used <= rest.len());
                whole.push(msg);
                rest = &rest[used..];
            }
            Ok(None) => break,
            Err(e) => {
                whole_err = Some(e);
                break;
            }
        }
    }

    let mut dec = FrameDecoder::new();
    let mut chunked = Vec::new();
    let mut chunk_err = None;
    'outer: for piece in stream.chunks(chunk) {
        if let Err(e) = dec.push(piece) {
            chunk_err = Some(e);
            break;
        }
        loop {
            match dec.next_message() {
                Ok(Some(m)) => chunked.push(m),
                Ok(None) => break,
                Err(e) => {
                    chunk_err = Some(e);
                    break 'outer;
                }
            }
        }
    }
    assert_eq!(whole, chunked);
    assert_eq!(whole_err, chunk_err);

    for msg in &whole {
        let bytes = encode_to_vec(msg).expect("a decoded message must re-encode");
        let decoded = decode_frame(&bytes).expect("re-encoded message must decode");
        assert_eq!(decoded, Some((msg.clone(), bytes.len())));
    }
});
