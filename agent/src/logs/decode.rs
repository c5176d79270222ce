//! Decodes one physical line of a container log: CRI or docker json-file.

use std::borrow::Cow;

use serde::Deserialize;

use super::chunk::StreamKind;
use super::timestamp::{self, Stamp};

/// One decoded line: a whole record (`partial == false`) or a part of one.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded<'a> {
    /// The runtime's RFC 3339 timestamp, checked to be valid and safe to embed in JSON as is;
    /// empty when `bad_timestamp`.
    pub timestamp: Cow<'a, [u8]>,
    /// The runtime's timestamp is impossible or has no zone: the record takes the time it
    /// was read and is flagged `bad_timestamp`.
    pub bad_timestamp: bool,
    /// stdout or stderr.
    pub stream: StreamKind,
    /// More parts of this record follow (CRI `P`, or a docker line without its newline).
    pub partial: bool,
    /// The text, without the record's trailing newline.
    pub message: Cow<'a, [u8]>,
}

/// Why a line did not decode; the line is shipped whole, flagged `malformed`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// No timestamp, stream or tag field where CRI puts them.
    #[error("not a CRI line")]
    NotCri,
    /// The line is not docker's JSON object.
    #[error("not a docker json-file line")]
    NotDocker,
}

/// Decodes a CRI line: `<RFC3339Nano> <stdout|stderr> <P|F>[:<more tags>] <text>`.
pub fn cri(line: &[u8]) -> Result<Decoded<'_>, Malformed> {
    // The first three spaces end the fields; the text is the rest, spaces and all (none
    // after the tag: no text).
    let (timestamp, rest) = split_at_space(line);
    let (timestamp, bad_timestamp) = checked(timestamp).ok_or(Malformed::NotCri)?;
    let rest = rest.ok_or(Malformed::NotCri)?;
    // Nearly every line goes on `stdout F ` (or `stderr`, `P`): read in place.
    let known = rest.get(..9).and_then(|head| {
        let stream = stream_kind(&head[..6]).filter(|_| head[6] == b' ')?;
        let partial = match &head[7..] {
            b"F " => false,
            b"P " => true,
            _ => return None,
        };
        Some((stream, partial, &rest[9..]))
    });
    let (stream, partial, message) = match known {
        Some(known) => known,
        None => {
            let (stream, rest) = split_at_space(rest);
            let stream = stream_kind(stream).ok_or(Malformed::NotCri)?;
            let (tag, message) = split_at_space(rest.ok_or(Malformed::NotCri)?);
            let partial = match tag.split(|&b| b == b':').next() {
                Some(b"F") => false,
                Some(b"P") => true,
                _ => return Err(Malformed::NotCri),
            };
            (stream, partial, message.unwrap_or_default())
        }
    };
    Ok(Decoded { timestamp, bad_timestamp, stream, partial, message: Cow::Borrowed(message) })
}

/// What comes before the first space, and what after it (`None`: no space).
fn split_at_space(bytes: &[u8]) -> (&[u8], Option<&[u8]>) {
    match memchr::memchr(b' ', bytes) {
        Some(at) => (&bytes[..at], Some(&bytes[at + 1..])),
        None => (bytes, None),
    }
}

#[derive(Deserialize)]
struct DockerLine<'a> {
    #[serde(borrow)]
    log: Cow<'a, str>,
    #[serde(borrow)]
    stream: Cow<'a, str>,
    #[serde(borrow)]
    time: Cow<'a, str>,
}

/// Decodes a docker json-file line. Docker splits long lines into parts whose `log` lacks the
/// trailing newline; such a part is `partial`.
pub fn docker(line: &[u8]) -> Result<Decoded<'_>, Malformed> {
    let parsed: DockerLine = match serde_json::from_slice(line) {
        Ok(parsed) => parsed,
        // Raw invalid UTF-8 inside the JSON: keep what is valid and replace the rest.
        Err(_) if std::str::from_utf8(line).is_err() => {
            let lossy = String::from_utf8_lossy(line);
            let owned: DockerLine = serde_json::from_str(&lossy).map_err(|_| Malformed::NotDocker)?;
            DockerLine {
                log: Cow::Owned(owned.log.into_owned()),
                stream: Cow::Owned(owned.stream.into_owned()),
                time: Cow::Owned(owned.time.into_owned()),
            }
        }
        Err(_) => return Err(Malformed::NotDocker),
    };
    let stream = stream_kind(parsed.stream.as_bytes()).ok_or(Malformed::NotDocker)?;
    let (timestamp, bad_timestamp) = match parsed.time {
        Cow::Borrowed(time) => checked(time.as_bytes()),
        Cow::Owned(time) => checked(time.as_bytes()).map(|(t, bad)| (Cow::Owned(t.into_owned()), bad)),
    }
    .ok_or(Malformed::NotDocker)?;
    let partial = !parsed.log.ends_with('\n');
    let message = match parsed.log {
        Cow::Borrowed(s) => Cow::Borrowed(s.strip_suffix('\n').unwrap_or(s).as_bytes()),
        Cow::Owned(mut s) => {
            if s.ends_with('\n') {
                s.pop();
            }
            Cow::Owned(s.into_bytes())
        }
    };
    Ok(Decoded { timestamp, bad_timestamp, stream, partial, message })
}

fn stream_kind(field: &[u8]) -> Option<StreamKind> {
    match field {
        b"stdout" => Some(StreamKind::Stdout),
        b"stderr" => Some(StreamKind::Stderr),
        _ => None,
    }
}

/// The timestamp field as it is to be written and whether it is unusable; `None` when the
/// field is no timestamp at all (the line is not the runtime's).
fn checked(t: &[u8]) -> Option<(Cow<'_, [u8]>, bool)> {
    match timestamp::classify(t) {
        Stamp::Valid(t) => Some((t, false)),
        Stamp::Unusable => Some((Cow::Borrowed(&[]), true)),
        Stamp::NotTimestamp => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_full_and_partial_lines() {
        let d = cri(b"2026-11-22T03:16:40.123456789Z stdout F hello world").unwrap();
        assert_eq!(&*d.timestamp, b"2026-11-22T03:16:40.123456789Z");
        assert_eq!((d.stream, d.partial, &*d.message), (StreamKind::Stdout, false, &b"hello world"[..]));
        let d = cri(b"2026-11-22T03:16:40.123456789+01:00 stderr P part ").unwrap();
        assert_eq!((d.stream, d.partial, &*d.message), (StreamKind::Stderr, true, &b"part "[..]));
    }

    #[test]
    fn cri_empty_messages_and_extra_tags() {
        assert_eq!(&*cri(b"2026-11-22T03:16:40Z stdout F ").unwrap().message, b"");
        assert_eq!(&*cri(b"2026-11-22T03:16:40Z stdout F").unwrap().message, b"");
        assert!(!cri(b"2026-11-22T03:16:40Z stdout F:x msg").unwrap().partial);
    }

    #[test]
    fn impossible_and_zoneless_timestamps_are_flagged_not_malformed() {
        for line in [&b"2024-13-45T99:99:99Z stdout F x"[..], b"2026-11-22T03:16:40 stdout F x", b"2026-11-22T03:16:40.5 stdout F x"] {
            let d = cri(line).unwrap();
            assert!(d.bad_timestamp && d.timestamp.is_empty(), "{}", String::from_utf8_lossy(line));
            assert_eq!(&*d.message, b"x");
        }
        let d = docker(br#"{"log":"x\n","stream":"stdout","time":"2024-02-30T00:00:00Z"}"#).unwrap();
        assert!(d.bad_timestamp);
    }

    #[test]
    fn lower_case_t_and_z_are_accepted_and_written_upper_case() {
        let d = cri(b"2026-11-22t03:16:40.5z stdout F x").unwrap();
        assert_eq!((&*d.timestamp, d.bad_timestamp), (&b"2026-11-22T03:16:40.5Z"[..], false));
        let d = docker(br#"{"log":"x\n","stream":"stdout","time":"2026-11-22t03:16:40.5z"}"#).unwrap();
        assert_eq!(&*d.timestamp, b"2026-11-22T03:16:40.5Z");
    }

    #[test]
    fn cri_garbage_is_malformed() {
        for line in [
            &b""[..],
            b"hello",
            b"2026-11-22T03:16:40Z stdin F x",
            b"2026-11-22T03:16:40Z stdout X x",
            b"yesterday stdout F x",
            b"2026-11-22T03:16:40\"Z stdout F x",
        ] {
            assert_eq!(cri(line), Err(Malformed::NotCri), "{}", String::from_utf8_lossy(line));
        }
    }

    /// The fields are cut where `splitn(4, ' ')` cuts them, whatever the spaces.
    #[test]
    fn cri_fields_are_cut_at_the_first_three_spaces() {
        fn by_splitn(line: &[u8]) -> Result<Decoded<'_>, Malformed> {
            let mut fields = line.splitn(4, |&b| b == b' ');
            let (timestamp, bad_timestamp) = checked(fields.next().unwrap_or_default()).ok_or(Malformed::NotCri)?;
            let stream = fields.next().and_then(stream_kind).ok_or(Malformed::NotCri)?;
            let partial = match fields.next().ok_or(Malformed::NotCri)?.split(|&b| b == b':').next() {
                Some(b"F") => false,
                Some(b"P") => true,
                _ => return Err(Malformed::NotCri),
            };
            let message = Cow::Borrowed(fields.next().unwrap_or_default());
            Ok(Decoded { timestamp, bad_timestamp, stream, partial, message })
        }
        let parts: [&[u8]; 10] = [b"", b" ", b"2026-11-22T03:16:40.5Z", b"stdout", b"stderr", b"F", b"P", b"P:x", b"a  b ", b"\xff"];
        let mut decoded = 0;
        for a in parts {
            for b in parts {
                for c in parts {
                    for d in parts {
                        for separator in [&b" "[..], b"", b"  "] {
                            let line = [a, separator, b, b" ", c, separator, d].concat();
                            assert_eq!(cri(&line), by_splitn(&line), "{}", String::from_utf8_lossy(&line));
                            decoded += usize::from(cri(&line).is_ok());
                        }
                    }
                }
            }
        }
        assert!(decoded > 20, "{decoded} lines decoded: the cases reach past the tag");
    }

    #[test]
    fn cri_keeps_invalid_utf8_bytes_for_the_encoder() {
        let d = cri(b"2026-11-22T03:16:40Z stdout F bad \xff\xfe bytes").unwrap();
        assert_eq!(&*d.message, b"bad \xff\xfe bytes");
    }

    #[test]
    fn docker_lines_strip_the_newline_and_mark_parts() {
        let d = docker(br#"{"log":"hi \"there\"\n","stream":"stderr","time":"2026-11-22T03:16:40.5Z"}"#).unwrap();
        assert_eq!((d.stream, d.partial, &*d.message), (StreamKind::Stderr, false, &b"hi \"there\""[..]));
        let d = docker(br#"{"log":"16k of text","stream":"stdout","time":"2026-11-22T03:16:40.5Z"}"#).unwrap();
        assert!(d.partial);
    }

    #[test]
    fn docker_with_raw_invalid_utf8_keeps_the_rest() {
        let d = docker(b"{\"log\":\"caf\xc3 ok\\n\",\"stream\":\"stdout\",\"time\":\"2026-11-22T03:16:40.5Z\"}").unwrap();
        assert_eq!(String::from_utf8(d.message.into_owned()).unwrap(), "caf\u{fffd} ok");
    }

    #[test]
    fn docker_garbage_is_malformed() {
        for line in [&br#"{"log":"x"}"#[..], br#"{"log":"x\n","stream":"stdout","time":"now"}"#, b"{\"log\":", b"plain text"] {
            assert_eq!(docker(line), Err(Malformed::NotDocker));
        }
    }
}
