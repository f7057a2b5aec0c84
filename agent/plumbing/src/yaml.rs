//! YAML in: `serde-saphyr` (serde_yaml is deprecated), with errors in one line that leads with the line number.
use serde::de::DeserializeOwned;

/// A YAML text that does not deserialize.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}{message}", .line.map(|l| format!("line {l}: ")).unwrap_or_default())]
pub struct YamlError {
    /// 1-based line of the problem, when known.
    pub line: Option<u64>,
    /// 1-based column of the problem, when known.
    pub column: Option<u64>,
    /// What is wrong, in one line.
    pub message: String,
}

impl From<serde_saphyr::Error> for YamlError {
    fn from(e: serde_saphyr::Error) -> Self {
        let loc = e.location();
        let line = loc.map(|l| l.line()).filter(|l| *l > 0);
        let column = loc.map(|l| l.column()).filter(|c| *c > 0);
        // The rendered error may carry a source snippet on the lines after
        // the first; the first says what is wrong.
        let text = e.to_string();
        let message = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or("invalid YAML")
            .trim_start_matches("error: ");
        let message = strip_location(message).to_owned();
        Self {
            line,
            column,
            message,
        }
    }
}

/// `msg` without a leading `line L column C: ` (the location is a field).
fn strip_location(msg: &str) -> &str {
    let rest = msg.strip_prefix("line ").and_then(|r| {
        let r = r.trim_start_matches(|c: char| c.is_ascii_digit());
        r.strip_prefix(" column ")
    });
    match rest.map(|r| r.trim_start_matches(|c: char| c.is_ascii_digit())) {
        Some(r) if r.starts_with(": ") => &r[2..],
        _ => msg,
    }
}

/// Deserializes one YAML document.
pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    serde_saphyr::from_str(text).map_err(YamlError::from)
}

/// Deserializes one YAML document; an error that a value deserializer
/// raised is prefixed with the value's path (`clusters[0].podCIDRs[1]: …`).
pub fn from_str_with_path<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    let mut path = None;
    let r = serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            let p = e.path().to_string();
            if p != "." && !p.is_empty() {
                path = Some(p);
            }
            e.into_inner()
        })
    });
    r.map_err(|e| {
        let mut e = YamlError::from(e);
        if let Some(p) = path
            && !e.message.contains(&p)
        {
            e.message = format!("{p}: {}", e.message);
        }
        e
    })
}

/// Deserializes every document of a YAML stream (`---` separated).
pub fn from_str_multi<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, YamlError> {
    serde_saphyr::from_multiple(text).map_err(YamlError::from)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn errors_are_one_line_with_the_line_number() {
        let e = from_str::<BTreeMap<String, u32>>("a: 1\nb: [\n").unwrap_err();
        assert!(e.line.is_some(), "{e:?}");
        assert_eq!(e.to_string().lines().count(), 1, "{e}");
        let e = from_str::<BTreeMap<String, u32>>("a: 1\nb: x\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e:?}");
        assert!(e.to_string().starts_with("line 2: "), "{e}");
        assert!(!e.message.contains("line 2"), "{e:?}");
    }

    #[test]
    fn errors_name_the_path_of_the_value() {
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Doc {
            items: Vec<Item>,
        }
        #[derive(serde::Deserialize, Debug)]
        #[allow(dead_code)]
        struct Item {
            n: u8,
        }
        let e = from_str_with_path::<Doc>("items:\n- n: 1\n- n: 300\n").unwrap_err();
        assert!(e.message.starts_with("items[1].n: "), "{e:?}");
        assert_eq!(e.line, Some(3), "{e:?}");
    }

    #[test]
    fn values_and_streams() {
        let v: serde_json::Value = from_str("a: [1, x, true]\nb: 10.1.0.0/16\nc:\n").unwrap();
        assert_eq!(v["a"][1], "x");
        assert_eq!(v["a"][0], 1);
        assert_eq!(v["b"], "10.1.0.0/16");
        assert!(v["c"].is_null());
        let docs: Vec<serde_json::Value> = from_str_multi("a: 1\n---\nb: 2\n").unwrap();
        assert_eq!(docs.len(), 2);
    }
}
