//! Enrolment decoding through the typed helpers and the incremental decoder; everything decoded
//! must re-encode to bytes that decode equal.
#![no_main]

use libfuzzer_sys::fuzz_target;
use petrel_proto::enrol::{
    decode_enrol_frame, decode_enrol_request, decode_enrol_response, encode_enrol,
    encode_enrol_request, encode_enrol_response, EnrolDecoder,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some((req, used))) = decode_enrol_request(data) {
        assert!(used <= data.len());
        let mut out = Vec::new();
        encode_enrol_request(&req, &mut out).expect("decoded request must re-encode");
        assert_eq!(decode_enrol_request(&out), Ok(Some((req, out.len()))));
    }
    if let Ok(Some((resp, used))) = decode_enrol_response(data) {
        assert!(used <= data.len());
        let mut out = Vec::new();
        encode_enrol_response(&resp, &mut out).expect("decoded response must re-encode");
        assert_eq!(decode_enrol_response(&out), Ok(Some((resp, out.len()))));
    }
    let mut dec = EnrolDecoder::new();
    if dec.push(data).is_ok() {
        while let Ok(Some(msg)) = dec.next_message() {
            let mut out = Vec::new();
            encode_enrol(&msg, &mut out).expect("decoded message must re-encode");
            assert_eq!(decode_enrol_frame(&out), Ok(Some((msg, out.len()))));
        }
    }
});
