//! `log.level` when a line states it: a JSON line's `level`/`severity`/`lvl` field, logfmt's
//! `level=`, a glog prefix (`E1122 ...`), or a leading level word (`ERROR`, `[warn]`, ...).

use std::sync::LazyLock;

use memchr::memmem::Finder;

use super::chunk::{Chunk, Occurrences, Record};

/// A normalised log level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    /// trace
    Trace,
    /// debug
    Debug,
    /// info
    Info,
    /// warn
    Warn,
    /// error
    Error,
    /// fatal (also critical, panic)
    Fatal,
}

impl Level {
    /// All levels, in order.
    pub const ALL: [Level; 6] = [Level::Trace, Level::Debug, Level::Info, Level::Warn, Level::Error, Level::Fatal];

    /// The `log.level` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
            Level::Fatal => "fatal",
        }
    }

    /// The level a word names (`ERROR`, `warning`, `crit`, ...), in any case.
    pub fn from_word(word: &[u8]) -> Option<Level> {
        // Most words name no level: their length or first letter turns them away.
        let first = word.first()? | 0x20;
        if word.len() < 3 || word.len() > 8 || !matches!(first, b'a' | b'c' | b'd' | b'e' | b'f' | b'i' | b'n' | b'p' | b't' | b'w') {
            return None;
        }
        let mut lower = [0u8; 8];
        for (l, b) in lower.iter_mut().zip(word) {
            *l = b.to_ascii_lowercase();
        }
        Some(match &lower[..word.len()] {
            b"trace" => Level::Trace,
            b"debug" | b"dbg" => Level::Debug,
            b"info" | b"inf" | b"notice" => Level::Info,
            b"warn" | b"warning" | b"wrn" => Level::Warn,
            b"error" | b"err" | b"eror" => Level::Error,
            b"fatal" | b"critical" | b"crit" | b"panic" | b"emerg" | b"alert" => Level::Fatal,
            _ => return None,
        })
    }
}

/// The level the message states, if it states one.
pub fn detect(message: &[u8]) -> Option<Level> {
    detect_with(message, |text| LOGFMT_KEY.find(text))
}

/// The level each record of `chunk` states (or its JSON fields gave, `given`): what
/// [`detect`] gives each message alone, logfmt's key searched for once in the whole chunk
/// (`keys`: reused from chunk to chunk).
pub fn detect_all(chunk: &Chunk, keys: &mut Occurrences, mut given: impl FnMut(usize) -> Option<Level>) -> Vec<Option<Level>> {
    keys.find(&LOGFMT_KEY, chunk);
    let stated = |record: &Record| {
        let end = record.message.end;
        // The text searched is the message less its leading whitespace: its end.
        detect_with(chunk.message(record), |text| match keys.inside(end - text.len() as u32..end) {
            Some(mut found) => found.next(),
            None => LOGFMT_KEY.find(text),
        })
    };
    chunk.records.iter().enumerate().map(|(i, record)| given(i).or_else(|| stated(record))).collect()
}

/// As [`detect`]; `logfmt_key` says where `level=` first occurs in the text it is given (the
/// message from its first byte that is not whitespace), if it does.
fn detect_with(message: &[u8], logfmt_key: impl FnOnce(&[u8]) -> Option<usize>) -> Option<Level> {
    let text = trim_start(message);
    match text.first()? {
        b'{' => json_field(text),
        b'I' | b'W' | b'E' | b'F' if is_glog(text) => Some(match text[0] {
            b'I' => Level::Info,
            b'W' => Level::Warn,
            b'E' => Level::Error,
            _ => Level::Fatal,
        }),
        _ => leading_word(text).or_else(|| logfmt(text, logfmt_key(text)?)),
    }
}

fn trim_start(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(s.len());
    &s[start..]
}

/// glog: `Lmmdd hh:mm:ss.uuuuuu threadid file:line] msg`.
fn is_glog(t: &[u8]) -> bool {
    t.len() > 6 && t[1..5].iter().all(u8::is_ascii_digit) && t[5] == b' '
}

fn leading_word(t: &[u8]) -> Option<Level> {
    let t = t.strip_prefix(b"[").unwrap_or(t);
    let end = t.iter().position(|b| !b.is_ascii_alphabetic()).unwrap_or(t.len());
    let after = t.get(end).copied();
    if after.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return None;
    }
    Level::from_word(&t[..end])
}

/// The searchers, built once (building one costs more than a search of a log line).
static JSON_KEYS: LazyLock<[Finder<'static>; 4]> =
    LazyLock::new(|| [Finder::new(b"\"level\""), Finder::new(b"\"severity\""), Finder::new(b"\"lvl\""), Finder::new(b"\"log.level\"")]);

/// logfmt's key, searched for once per line (once per chunk by [`detect_all`]): one vector
/// scan, where stopping at each of a logfmt line's `=` signs costs a call per pair.
static LOGFMT_KEY: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"level="));

/// The value of the line's first `level=` (at `at` in `t`), when that is a key of its own
/// (the line's start or after a space).
fn logfmt(t: &[u8], at: usize) -> Option<Level> {
    if at > 0 && t[at - 1] != b' ' {
        return None;
    }
    let value = &t[at + 6..];
    let value = value.strip_prefix(b"\"").unwrap_or(value);
    let end = value.iter().position(|b| !b.is_ascii_alphabetic()).unwrap_or(value.len());
    Level::from_word(&value[..end])
}

fn json_field(t: &[u8]) -> Option<Level> {
    for key in JSON_KEYS.iter() {
        if let Some(at) = key.find(t) {
            let rest = trim_start(&t[at + key.needle().len()..]);
            let rest = trim_start(rest.strip_prefix(b":")?);
            let rest = rest.strip_prefix(b"\"")?;
            let end = rest.iter().position(|&b| b == b'"')?;
            return Level::from_word(&rest[..end]);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines and the level each states.
    const CASES: &[(&str, Option<Level>)] = &[
        (r#"{"ts":1,"level":"error","msg":"boom"}"#, Some(Level::Error)),
        (r#"{"severity": "WARNING", "message": "x"}"#, Some(Level::Warn)),
        (r#"{"lvl":"dbug"}"#, None),
        (r#"{"msg":"no level here"}"#, None),
        ("E1122 03:16:40.123456    1 main.go:42] failed", Some(Level::Error)),
        ("I1122 03:16:40.123456    1 main.go:42] ok", Some(Level::Info)),
        ("ERROR: connection refused", Some(Level::Error)),
        ("[warn] disk almost full", Some(Level::Warn)),
        ("INFO request id=3", Some(Level::Info)),
        ("CRITICAL GPU fell off the bus", Some(Level::Fatal)),
        ("time=2026-11-22 level=debug msg=x", Some(Level::Debug)),
        ("level=error msg=x", Some(Level::Error)),
        (r#"ts=1 level="warn" msg=x"#, Some(Level::Warn)),
        ("a=b=c level=info", Some(Level::Info)),
        ("sublevel=3 level=error", None),
        ("lvl=x evel=error", None),
        ("Information is power", None),
        ("errors=0 warnings=3", None),
        ("step=120 loss=0.53", None),
        ("Error_code 5", None),
        ("", None),
    ];

    #[test]
    fn levels_are_found_where_programs_write_them() {
        for (line, want) in CASES {
            assert_eq!(detect(line.as_bytes()), *want, "{line}");
        }
    }

    /// Looked for once in the chunk's whole buffer, logfmt's key gives each record what a
    /// search of its own message gives: nothing from across a message's edges.
    #[test]
    fn levels_detected_in_a_whole_chunk_are_each_records_own() {
        let edges = ["x level", "=error", "  level=warn", " =info", "level", "level=fatal"];
        let lines: Vec<&str> = CASES.iter().map(|(line, _)| *line).chain(edges).collect();
        // In a timestamp's place: `level=` across both edges of every message.
        let chunk = Chunk::for_tests(lines.iter().map(|line| (&b"=level"[..], line.as_bytes())));
        let alone: Vec<Option<Level>> = lines.iter().map(|line| detect(line.as_bytes())).collect();
        let mut keys = Occurrences::default();
        assert_eq!(detect_all(&chunk, &mut keys, |_| None), alone);
        assert_eq!(alone.iter().filter(|l| l.is_some()).count(), 14, "{alone:?}");
        let given = detect_all(&chunk, &mut keys, |i| (i < 2).then_some(Level::Trace));
        assert_eq!(given[..3], [Some(Level::Trace), Some(Level::Trace), alone[2]], "a level given stands");
    }

    /// A chunk holding more `level=` than are kept is searched message by message.
    #[test]
    fn a_chunk_full_of_logfmt_keys_is_searched_message_by_message() {
        let full = "level=".repeat(9000);
        let chunk = Chunk::for_tests([(&b""[..], full.as_bytes()), (b"", b"ts=1 level=warn")]);
        assert_eq!(detect_all(&chunk, &mut Occurrences::default(), |_| None), [None, Some(Level::Warn)]);
    }

    /// Every word a level goes by, in any case, and no word around them.
    #[test]
    fn every_level_word_is_known_in_any_case() {
        let words: &[(&str, Level)] = &[
            ("trace", Level::Trace),
            ("debug", Level::Debug),
            ("dbg", Level::Debug),
            ("info", Level::Info),
            ("inf", Level::Info),
            ("notice", Level::Info),
            ("warn", Level::Warn),
            ("warning", Level::Warn),
            ("wrn", Level::Warn),
            ("error", Level::Error),
            ("err", Level::Error),
            ("eror", Level::Error),
            ("fatal", Level::Fatal),
            ("critical", Level::Fatal),
            ("crit", Level::Fatal),
            ("panic", Level::Fatal),
            ("emerg", Level::Fatal),
            ("alert", Level::Fatal),
        ];
        for &(word, level) in words {
            for form in [word.to_string(), word.to_uppercase(), word[..1].to_uppercase() + &word[1..]] {
                assert_eq!(Level::from_word(form.as_bytes()), Some(level), "{form}");
            }
        }
        for word in ["", "e", "er", "errors", "criticals", "rank", "step", "Xinfo", "[info", "info:"] {
            assert_eq!(Level::from_word(word.as_bytes()), None, "{word}");
        }
    }
}
