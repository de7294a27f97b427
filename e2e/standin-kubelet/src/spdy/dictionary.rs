//! The SPDY/3 header-compression dictionary (draft-mbelshe-httpbis-spdy-00, section 2.6.10.1).
//!
//! Both directions of a SPDY/3 connection prime their zlib stream with this dictionary; the
//! bytes must match the peer's exactly or its inflater rejects the first header block with an
//! Adler-32 mismatch. The dictionary is a run of length-prefixed words (4-byte big-endian
//! length, then the word) followed by one block of plain text; it is built here from those two
//! parts rather than spelled out as 1423 hex bytes.

use std::sync::OnceLock;

/// Words stored as `u32 length || bytes`, in the specification's order.
const PREFIXED_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The plain-text tail that follows the prefixed words.
const TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request",
    "401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented",
    "503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 ",
    "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,",
    "application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=",
    "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.",
);

/// Length of the SPDY/3 dictionary in bytes.
pub const DICTIONARY_LEN: usize = 1423;

/// The SPDY/3 zlib dictionary.
pub fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        let mut out = Vec::with_capacity(DICTIONARY_LEN);
        for word in PREFIXED_WORDS {
            // Every word is a few bytes long, so the cast cannot truncate.
            out.extend_from_slice(&(word.len() as u32).to_be_bytes());
            out.extend_from_slice(word.as_bytes());
        }
        out.extend_from_slice(TAIL.as_bytes());
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_has_the_specified_length_and_edges() {
        let d = dictionary();
        assert_eq!(d.len(), DICTIONARY_LEN);
        assert_eq!(&d[..11], b"\x00\x00\x00\x07options");
        assert!(d.ends_with(b",*,enq=0."));
        // Spot checks against the published hex dump.
        let pos = d
            .windows(6)
            .position(|w| w == b"origin")
            .expect("origin present");
        assert_eq!(&d[pos - 4..pos], &[0, 0, 0, 6]);
        assert_eq!(&d[pos + 6..pos + 12], b"100101");
    }
}
