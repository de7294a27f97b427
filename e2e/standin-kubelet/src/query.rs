//! `application/x-www-form-urlencoded` query parsing (repeated keys kept in order).

/// A parsed query string.
#[derive(Debug, Clone, Default)]
pub struct Query {
    pairs: Vec<(String, String)>,
}

impl Query {
    /// Parses `a=1&b=x%20y&b=z`; malformed escapes are kept literally.
    pub fn parse(q: Option<&str>) -> Query {
        let pairs = q
            .unwrap_or("")
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (decode(k), decode(v))
            })
            .collect();
        Query { pairs }
    }

    /// First value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// All values of `key`, in order.
    pub fn get_all(&self, key: &str) -> Vec<String> {
        self.pairs
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// `key` is "1" or a Go-`ParseBool` true ("t", "true", ...).
    pub fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(parse_bool)
    }
}

/// Go's `strconv.ParseBool` true values.
pub fn parse_bool(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "true" | "TRUE" | "True")
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes `s`, turning `+` into a space.
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let decoded = bytes
                    .get(i + 1)
                    .and_then(|&h| hex(h))
                    .zip(bytes.get(i + 2).and_then(|&l| hex(l)));
                match decoded {
                    Some((h, l)) => {
                        out.push(h << 4 | l);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repeated_and_escaped_values() {
        let q = Query::parse(Some(
            "command=sh&command=-c&command=exit+3%3B%20echo&input=1&bad=%zz&x",
        ));
        assert_eq!(q.get_all("command"), vec!["sh", "-c", "exit 3; echo"]);
        assert!(q.flag("input"));
        assert!(!q.flag("output"));
        assert_eq!(q.get("bad"), Some("%zz"));
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(decode("%"), "%");
        assert_eq!(decode("%4"), "%4");
    }
}
