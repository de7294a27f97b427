//! `FrameBuffer` internals a mutation run showed untested: consumed bytes are dropped before
//! more are appended, so the backing buffer stays bounded by the capacity even when a partial
//! frame is always pending; and list counts are bounded by the smallest element encodings.

#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn consumed_bytes_are_compacted_away() {
    let mut fb = FrameBuffer::new(10);
    // Each round: one whole frame and the first 3 bytes of the next, so the buffer is never
    // drained completely.
    let frame = [1u8, 0, 0, 0, 2, 7, 7];
    fb.push(&frame[..3]).unwrap();
    for _ in 0..1000 {
        fb.push(&frame[3..]).unwrap();
        fb.push(&frame[..3]).unwrap();
        assert_eq!(fb.next_with(|f| Ok(f.body.len())), Ok(Some(2)));
        assert_eq!(fb.buffered(), 3);
        assert!(fb.buf.len() <= fb.capacity(), "{} bytes held", fb.buf.len());
    }
    assert!(fb.buf.len() <= 2 * frame.len());
}

#[test]
fn smallest_encodings() {
    assert_eq!(MIN_STRING_LEN, 2);
    assert_eq!(MIN_IP_ADDR_LEN, 5);
    assert_eq!(MIN_IP_CIDR_LEN, 6);
    // 16 CIDRs need at least 96 bytes; 80 are there.
    let mut body = vec![0, 16];
    body.extend_from_slice(&[4, 10, 0, 0, 0, 8].repeat(13));
    body.extend_from_slice(&[0, 0]);
    assert_eq!(body.len(), 2 + 80);
    assert_eq!(
        Reader::new(&body).count("cidrs", MAX_POD_CIDRS, MIN_IP_CIDR_LEN),
        Err(DecodeError::Truncated {
            field: "cidrs",
            needed: 16
        })
    );
}
