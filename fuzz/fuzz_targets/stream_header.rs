//! Proxied-stream headers: decode both header kinds from arbitrary bytes, check the header
//! length never depends on the bytes after it, and that re-encoding round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_proto::stream::{
    decode_stream_open, decode_stream_result, encode_stream_open, encode_stream_result,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((open, used))) = decode_stream_open(data) {
        assert!(used <= data.len());
        assert_eq!(
            decode_stream_open(&data[..used]),
            Ok(Some((open.clone(), used)))
        );
        let mut out = Vec::new();
        encode_stream_open(&open, &mut out).expect("decoded header must re-encode");
        assert_eq!(decode_stream_open(&out), Ok(Some((open, out.len()))));
    }
    if let Ok(Some((res, used))) = decode_stream_result(data) {
        assert!(used <= data.len());
        assert_eq!(
            decode_stream_result(&data[..used]),
            Ok(Some((res.clone(), used)))
        );
        let mut out = Vec::new();
        encode_stream_result(&res, &mut out).expect("decoded result must re-encode");
        assert_eq!(decode_stream_result(&out), Ok(Some((res, out.len()))));
    }
});
