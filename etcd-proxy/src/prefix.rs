//! Confinement of every requested key range to the one allowed prefix.
use std::fmt;

/// Why a key range is refused; the message names the range and the allowed prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Escape {
    #[error("empty key is refused: only keys under {prefix:?} are served")]
    EmptyKey { prefix: String },
    #[error("key {key:?} is outside the allowed prefix {prefix:?}")]
    KeyOutside { key: String, prefix: String },
    #[error(
        "range end \"\\0\" (every key from {key:?} on) is refused: only keys under {prefix:?} are served; use a prefix range"
    )]
    FromKey { key: String, prefix: String },
    #[error(
        "range end {range_end:?} reaches beyond the allowed prefix {prefix:?} (its end is {prefix_end:?})"
    )]
    RangeEndOutside {
        range_end: String,
        prefix: String,
        prefix_end: String,
    },
}

impl Escape {
    /// Short label for the refused-requests metric.
    pub fn reason(&self) -> &'static str {
        match self {
            Escape::EmptyKey { .. } => "empty_key",
            Escape::KeyOutside { .. } => "key_outside_prefix",
            Escape::FromKey { .. } => "from_key",
            Escape::RangeEndOutside { .. } => "range_end_outside_prefix",
        }
    }
}

/// The allowed key prefix and its exclusive end (the prefix with its last byte
/// incremented), the same bound etcd computes for `--prefix`.
#[derive(Clone, PartialEq, Eq)]
pub struct Prefix {
    start: Vec<u8>,
    end: Vec<u8>,
}

impl fmt::Debug for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Prefix({:?})", self.display())
    }
}

/// Lossy rendering of key bytes for messages and logs.
pub fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The exclusive end of the range of all keys starting with `prefix`, as etcd
/// computes it; `None` when no such bound exists (all bytes 0xff).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

impl Prefix {
    /// `None` when the prefix is empty or has no finite end: confinement to
    /// such a prefix would confine nothing.
    pub fn new(prefix: &str) -> Option<Prefix> {
        if prefix.is_empty() {
            return None;
        }
        let start = prefix.as_bytes().to_vec();
        let end = prefix_end(&start)?;
        Some(Prefix { start, end })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.start
    }

    pub fn display(&self) -> String {
        show(&self.start)
    }

    /// Checks an etcd (key, range_end) pair: empty range_end is the single
    /// key, "\0" every key from `key` on, anything else the range
    /// [key, range_end).
    pub fn check(&self, key: &[u8], range_end: &[u8]) -> Result<(), Escape> {
        let prefix = self.display();
        if key.is_empty() {
            return Err(Escape::EmptyKey { prefix });
        }
        if !key.starts_with(&self.start) {
            return Err(Escape::KeyOutside {
                key: show(key),
                prefix,
            });
        }
        if range_end.is_empty() {
            return Ok(());
        }
        if range_end == [0] {
            return Err(Escape::FromKey {
                key: show(key),
                prefix,
            });
        }
        if range_end > self.end.as_slice() {
            return Err(Escape::RangeEndOutside {
                range_end: show(range_end),
                prefix,
                prefix_end: show(&self.end),
            });
        }
        Ok(())
    }

    /// Whether one key lies under the prefix (used to drop anything the
    /// upstream might send beyond it).
    pub fn contains(&self, key: &[u8]) -> bool {
        key.starts_with(&self.start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> Prefix {
        Prefix::new("podmesh/v1/").unwrap()
    }

    #[test]
    fn prefix_end_increments_last_byte_and_skips_ff() {
        assert_eq!(prefix_end(b"a/"), Some(b"a0".to_vec()));
        assert_eq!(prefix_end(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(b"\xff\xff"), None);
        assert!(Prefix::new("").is_none());
    }

    #[test]
    fn allows_keys_and_ranges_inside() {
        let p = p();
        assert_eq!(p.check(b"podmesh/v1/nodes/east/n1", b""), Ok(()));
        assert_eq!(p.check(b"podmesh/v1/", b"podmesh/v10"), Ok(()));
        assert_eq!(p.check(b"podmesh/v1/nodes/", b"podmesh/v1/nodes0"), Ok(()));
        assert_eq!(p.check(b"podmesh/v1/a", b"podmesh/v1/b"), Ok(()));
    }

    #[test]
    fn refuses_every_escape() {
        let p = p();
        assert_eq!(p.check(b"", b"").unwrap_err().reason(), "empty_key");
        assert_eq!(p.check(b"", b"\0").unwrap_err().reason(), "empty_key");
        assert_eq!(
            p.check(b"other", b"").unwrap_err().reason(),
            "key_outside_prefix"
        );
        assert_eq!(
            p.check(b"podmesh/v1", b"").unwrap_err().reason(),
            "key_outside_prefix"
        );
        assert_eq!(
            p.check(b"podmesh/", b"podmesh0").unwrap_err().reason(),
            "key_outside_prefix"
        );
        assert_eq!(
            p.check(b"podmesh/v1/x", b"\0").unwrap_err().reason(),
            "from_key"
        );
        assert_eq!(
            p.check(b"podmesh/v1/x", b"podmesh/v2")
                .unwrap_err()
                .reason(),
            "range_end_outside_prefix"
        );
        assert_eq!(
            p.check(b"podmesh/v1/x", b"podmesh/v10\0")
                .unwrap_err()
                .reason(),
            "range_end_outside_prefix"
        );
        assert!(
            p.check(b"podmesh/v1/x", b"\0")
                .unwrap_err()
                .to_string()
                .contains("podmesh/v1/")
        );
    }
}
