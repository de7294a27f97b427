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

/// A frame of `total` bytes (header included) with a body of zeros.
fn frame_of_total(total: usize) -> Vec<u8> {
    let body = total - FRAME_HEADER_LEN;
    let mut v = vec![1u8];
    v.extend_from_slice(&u32::try_from(body).unwrap().to_be_bytes());
    v.resize(total, 0);
    v
}

#[test]
fn drained_buffer_keeps_at_most_4096_bytes_of_capacity() {
    // Pushing into an empty buffer reserves exactly what arrived; draining it keeps that
    // capacity up to 4096 bytes (a session of pings reuses it) and frees anything larger.
    for (total, kept) in [(7, 7), (4095, 4095), (4096, 4096), (4097, 0), (8192, 0)] {
        let mut fb = FrameBuffer::new(8192);
        fb.push(&frame_of_total(total)).unwrap();
        assert_eq!(
            fb.buf.capacity(),
            total,
            "exact growth for a {total}-byte frame"
        );
        assert_eq!(
            fb.next_with(|f| Ok(f.body.len())),
            Ok(Some(total - FRAME_HEADER_LEN))
        );
        assert_eq!((fb.buffered(), fb.start, fb.buf.len()), (0, 0, 0));
        assert_eq!(
            fb.buf.capacity(),
            kept,
            "capacity kept after a {total}-byte frame"
        );
    }
}

#[test]
fn capacity_is_kept_while_bytes_are_pending() {
    // A 5000-byte frame followed by the first byte of the next: nothing is freed until the
    // buffer is empty.
    let mut fb = FrameBuffer::new(8192);
    let mut data = frame_of_total(5000);
    data.push(1);
    fb.push(&data).unwrap();
    assert_eq!(fb.next_with(|f| Ok(f.body.len())), Ok(Some(4995)));
    assert_eq!((fb.buffered(), fb.start), (1, 5000));
    assert_eq!(fb.buf.capacity(), 5001);
}
