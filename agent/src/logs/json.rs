//! The top-level members of a JSON object, as raw slices of the text: no value is decoded and
//! nothing is allocated per key. The text must first pass [`is_object`] (serde_json's own
//! validation); the scanner then only finds where each key and value begins and ends.

use serde::de::IgnoredAny;

/// Whether `text` is exactly one JSON object (surrounding whitespace allowed), as serde_json
/// reads it. Nothing is built: the value is only checked.
pub fn is_object(text: &str) -> bool {
    text.trim_start().starts_with('{') && serde_json::from_str::<IgnoredAny>(text).is_ok()
}

/// One member of an object: the key's JSON string token (quotes and escapes included) and
/// the value's JSON text, both slices of the object's text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    /// The key, as a JSON string token.
    pub key: &'a str,
    /// The value, as JSON text.
    pub value: &'a str,
}

/// Appends the members of `object` (valid JSON, per [`is_object`]) to `out`, in order.
pub fn members<'a>(object: &'a str, out: &mut Vec<Member<'a>>) {
    let b = object.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return;
    }
    i = skip_ws(b, i + 1);
    while b.get(i) == Some(&b'"') {
        let key_end = string_end(b, i);
        let colon = skip_ws(b, key_end);
        let start = skip_ws(b, colon + 1);
        let end = value_end(b, start);
        if end > b.len() || key_end > b.len() {
            return;
        }
        out.push(Member { key: &object[i..key_end], value: &object[start..end] });
        i = skip_ws(b, end);
        if b.get(i) != Some(&b',') {
            return;
        }
        i = skip_ws(b, i + 1);
    }
}

/// The nesting depth of a value: 0 for a scalar, 1 for `{}` or `[1]`, 2 for `{"a":[1]}`, ...
pub fn depth(value: &str) -> usize {
    let b = value.as_bytes();
    let (mut depth, mut deepest, mut i) = (0usize, 0usize, 0usize);
    while i < b.len() {
        match b[i] {
            b'"' => {
                i = string_end(b, i);
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    deepest
}

/// Whether an object anywhere inside `value` repeats a key (Elasticsearch refuses such a
/// document: it parses with duplicate detection on).
pub fn has_duplicate_keys(value: &str) -> bool {
    let b = value.as_bytes();
    match b.first() {
        Some(b'{') => {
            let mut inner = Vec::new();
            members(value, &mut inner);
            inner.iter().enumerate().any(|(n, m)| inner[..n].iter().any(|o| o.key == m.key))
                || inner.iter().any(|m| has_duplicate_keys(m.value))
        }
        Some(b'[') => {
            let mut i = skip_ws(b, 1);
            while i < b.len() && b[i] != b']' {
                let end = value_end(b, i);
                if end > b.len() || has_duplicate_keys(&value[i..end]) {
                    return end <= b.len();
                }
                i = skip_ws(b, end);
                if b.get(i) == Some(&b',') {
                    i = skip_ws(b, i + 1);
                }
            }
            false
        }
        _ => false,
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The index after the string token starting at `i` (a `"`).
fn string_end(b: &[u8], i: usize) -> usize {
    let mut j = i + 1;
    while let Some(k) = b.get(j..).and_then(|rest| memchr::memchr2(b'"', b'\\', rest)) {
        j += k;
        if b[j] == b'\\' {
            j += 2;
        } else {
            return j + 1;
        }
    }
    b.len() + 1
}

/// The index after the value starting at `i`.
fn value_end(b: &[u8], i: usize) -> usize {
    match b.get(i) {
        Some(b'"') => string_end(b, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = string_end(b, j);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return j + 1;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            b.len() + 1
        }
        Some(_) => {
            let len = b[i..].iter().position(|c| matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')).unwrap_or(b.len() - i);
            i + len
        }
        None => b.len() + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(text: &str) -> Vec<(&str, &str)> {
        assert!(is_object(text), "{text}");
        let mut out = Vec::new();
        members(text, &mut out);
        out.into_iter().map(|m| (m.key, m.value)).collect()
    }

    #[test]
    fn members_are_found_whatever_their_values_hold() {
        assert_eq!(
            pairs(r#" { "a" : 1 , "b\"}":"x,}]\\" ,"c":{"d":[1,{"e":"}"}]},"f":[],"g":null,"h":-1.5e3,"i":true} "#),
            [
                (r#""a""#, "1"),
                (r#""b\"}""#, r#""x,}]\\""#),
                (r#""c""#, r#"{"d":[1,{"e":"}"}]}"#),
                (r#""f""#, "[]"),
                (r#""g""#, "null"),
                (r#""h""#, "-1.5e3"),
                (r#""i""#, "true")
            ]
        );
        assert_eq!(pairs("{}"), []);
    }

    #[test]
    fn not_quite_json_is_not_an_object() {
        for text in [
            r#"{"a":1,}"#,
            r#"{"a":1} trailing"#,
            r#"{a:1}"#,
            r#"{"a":01}"#,
            r#"{"a":"\x"}"#,
            "{\"a\":\"tab\there\"}",
            r#"{"a":1"#,
            r#"[1,2]"#,
            r#""{}""#,
            r#"{"a":1}{"b":2}"#,
            "",
        ] {
            assert!(!is_object(text), "{text}");
        }
    }

    #[test]
    fn depth_and_duplicate_keys_are_seen_inside_values() {
        assert_eq!((depth("1"), depth(r#""[{""#), depth("{}"), depth(r#"{"a":[{"b":1}]}"#)), (0, 0, 1, 3));
        assert!(has_duplicate_keys(r#"{"a":1,"a":2}"#));
        assert!(has_duplicate_keys(r#"[1,{"x":{"b":1,"b":2}}]"#));
        assert!(!has_duplicate_keys(r#"{"a":{"a":1},"b":[{"a":1},{"a":2}]}"#));
    }
}
