//! The runtime's timestamp of a line, checked before it becomes `@timestamp`: Elasticsearch
//! refuses a whole document whose `@timestamp` it cannot store (`date_nanos`: RFC 3339 with a
//! zone, 1970 to 2262), and the record would be lost. RFC 3339 allows a lower-case `t` and
//! `z`; those are written upper case, as every consumer accepts.

use std::borrow::Cow;
use std::cell::Cell;

/// What a line's timestamp field is.
#[derive(Debug, PartialEq, Eq)]
pub enum Stamp<'a> {
    /// A valid timestamp, as it is to be written (upper case `T` and `Z`).
    Valid(Cow<'a, [u8]>),
    /// Shaped like a timestamp but impossible (`2024-13-45T99:99:99Z`), without a zone, or out
    /// of the range Elasticsearch stores: the line is a runtime's line, its time is not usable.
    Unusable,
    /// Not a timestamp at all: the line is not the runtime's format.
    NotTimestamp,
}

/// Latest instant a `date_nanos` field holds: 2262-04-11T23:47:16.854775807Z.
const MAX_NANOS: i128 = i64::MAX as i128;

/// Classifies the timestamp field of a runtime line.
pub fn classify(t: &[u8]) -> Stamp<'_> {
    if is_next_in_second(t) {
        return Stamp::Valid(Cow::Borrowed(t));
    }
    let Some(lower_case) = timestamp_shape(t) else {
        return Stamp::NotTimestamp;
    };
    match unix_nanos(t) {
        Some(n) if (0..=MAX_NANOS).contains(&n) => {
            // A UTC second in range whatever its fraction: the next lines of it are quick.
            if is_runtime_form(t) && n + 1_000_000_000 <= MAX_NANOS {
                VALID_SECOND.set(second_key(t));
            }
        }
        _ => return Stamp::Unusable,
    }
    if lower_case {
        return Stamp::Valid(Cow::Owned(t.to_ascii_uppercase()));
    }
    Stamp::Valid(Cow::Borrowed(t))
}

thread_local! {
    /// The date and time of the last valid timestamp in the runtimes' form (UTC, upper case,
    /// in range with any fraction), as [`second_key`]: most lines of a file follow one another
    /// within a second. [`NO_SECOND`] until there is one.
    static VALID_SECOND: Cell<(u128, u32)> = const { Cell::new(NO_SECOND) };
}

/// No second yet: what nineteen NUL bytes read as, which no line must match.
const NO_SECOND: (u128, u32) = (0, 0);

/// The first 19 bytes of `t` (at least that long), `YYYY-MM-DDTHH:MM:SS`, as two numbers
/// (bytes 0 to 15 and 15 to 18): compared in registers, not byte by byte.
fn second_key(t: &[u8]) -> (u128, u32) {
    let head: [u8; 16] = t[..16].try_into().expect("16 bytes");
    let tail: [u8; 4] = t[15..19].try_into().expect("4 bytes");
    (u128::from_le_bytes(head), u32::from_le_bytes(tail))
}

/// Whether `t` is `YYYY-MM-DDTHH:MM:SS.nnnnnnnnnZ`, the form runtimes write, in the second
/// of the last valid one: valid, as it stands, without reading its date again.
fn is_next_in_second(t: &[u8]) -> bool {
    is_runtime_form(t) && {
        let key = second_key(t);
        key != NO_SECOND && key == VALID_SECOND.get()
    }
}

/// `t` ends as `.nnnnnnnnnZ` (its date and time not looked at).
fn is_runtime_form(t: &[u8]) -> bool {
    runtime_fraction(t).is_some()
}

/// The nanoseconds of `t` when it ends as `.nnnnnnnnnZ` (its date and time not looked at).
fn runtime_fraction(t: &[u8]) -> Option<u32> {
    if t.len() != 30 || t[19] != b'.' || t[29] != b'Z' {
        return None;
    }
    let first: [u8; 8] = t[20..28].try_into().expect("8 bytes");
    let last = t[28].wrapping_sub(b'0');
    Some(eight_digits(u64::from_le_bytes(first))? * 10 + u32::from(last)).filter(|_| last <= 9)
}

/// The number eight ASCII digits spell, the first in the lowest byte of `bytes`; `None` unless
/// all are digits. Worked out eight at a time in one register: pairs, then fours, then the
/// eight (each step a multiply that adds neighbours with their weights).
fn eight_digits(bytes: u64) -> Option<u32> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    // Every byte 0x30..=0x39: its high nibble 3, and still 3 with 6 added to it.
    if bytes & (0xf0 * ONES) != 0x30 * ONES || (bytes + 6 * ONES) & (0xf0 * ONES) != 0x30 * ONES {
        return None;
    }
    let v = bytes - 0x30 * ONES;
    // Byte 2k: digit 2k times 10 plus digit 2k + 1.
    let v = (v * 10 + (v >> 8)) & 0x00ff_00ff_00ff_00ff;
    // The four pairs times 1,000,000, 10,000, 100 and 1, summed in bits 32.. (what carries
    // past bit 63 is not wanted): pairs 0 and 2 from one multiply, pairs 1 and 3 from another.
    let pairs_0_2 = (v & 0x0000_00ff_0000_00ff).wrapping_mul(100 + (1_000_000 << 32));
    let pairs_1_3 = ((v >> 16) & 0x0000_00ff_0000_00ff).wrapping_mul(1 + (10_000 << 32));
    Some((pairs_0_2.wrapping_add(pairs_1_3) >> 32) as u32)
}

/// For `YYYY-MM-DD[Tt]...` made only of digits and `-:.TtZz+` (a runtime's timestamp field,
/// and safe to copy into JSON unescaped), whether it has a lower-case `t` or `z`.
fn timestamp_shape(t: &[u8]) -> Option<bool> {
    if !(19..=40).contains(&t.len()) || t[4] != b'-' || !matches!(t[10], b'T' | b't') {
        return None;
    }
    let mut lower_case = false;
    for b in t {
        match b {
            b'0'..=b'9' | b'-' | b':' | b'.' | b'T' | b'Z' | b'+' => {}
            b't' | b'z' => lower_case = true,
            _ => return None,
        }
    }
    Some(lower_case)
}

thread_local! {
    /// What [`unix_nanos`] read last.
    static LAST_SECOND: Cell<Seconds> = const { Cell::new(Seconds::NONE) };
}

/// The date and time (to the second) last read, as [`second_key`], and its seconds since the
/// epoch: a file's lines share it many at a time. [`NO_SECOND`] until then.
#[derive(Debug, Clone, Copy)]
pub struct Seconds {
    key: (u128, u32),
    seconds: i64,
}

impl Default for Seconds {
    fn default() -> Seconds {
        Seconds::NONE
    }
}

impl Seconds {
    /// No second read yet.
    const NONE: Seconds = Seconds { key: NO_SECOND, seconds: 0 };

    /// As [`unix_nanos`], for a caller reading many timestamps in a row (a chunk's records),
    /// which keeps the last second itself rather than in the thread's.
    pub fn unix_nanos(&mut self, t: &[u8]) -> Option<i128> {
        let prefix: &[u8; 19] = t.get(..19)?.try_into().ok()?;
        let key = second_key(prefix);
        if key != self.key || key == NO_SECOND {
            *self = Seconds { key, seconds: date_time_seconds(prefix)? };
        }
        if let Some(fraction) = runtime_fraction(t) {
            // `.nnnnnnnnnZ`: the nanoseconds as they stand.
            return Some(i128::from(self.seconds) * 1_000_000_000 + i128::from(fraction));
        }
        with_offset(t, self.seconds)
    }
}

/// Nanoseconds since the epoch of a strict RFC 3339 timestamp
/// (`YYYY-MM-DDTHH:MM:SS[.fraction]` then `Z` or `±HH:MM`), `None` when it is not one.
pub fn unix_nanos(t: &[u8]) -> Option<i128> {
    let mut last = LAST_SECOND.get();
    let nanos = last.unix_nanos(t);
    LAST_SECOND.set(last);
    nanos
}

/// The nanoseconds of `t`, whose first 19 bytes are `seconds` since the epoch read as UTC,
/// from its fraction and offset (the general form: any number of fraction digits, `Z` or
/// `±HH:MM`).
fn with_offset(t: &[u8], seconds: i64) -> Option<i128> {
    let num = |range: std::ops::Range<usize>| -> Option<i64> { digits(t.get(range)?) };
    let sep = |i: usize, c: u8| t.get(i).is_some_and(|b| b.eq_ignore_ascii_case(&c));
    let mut at = 19;
    let mut fraction = 0i64;
    if sep(at, b'.') {
        let count = t[at + 1..].iter().take_while(|b| b.is_ascii_digit()).count();
        if count == 0 || count > 9 {
            return None;
        }
        fraction = num(at + 1..at + 1 + count)? * 10i64.pow(9 - count as u32);
        at += 1 + count;
    }
    let offset_s = match &t[at..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (hours, minutes) = (num(at + 1..at + 3)?, num(at + 4..at + 6)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let s = hours * 3600 + minutes * 60;
            if *sign == b'-' {
                -s
            } else {
                s
            }
        }
        _ => return None,
    };
    Some(i128::from(seconds - offset_s) * 1_000_000_000 + i128::from(fraction))
}

/// The number `digits` (all decimal digits) spell.
fn digits(digits: &[u8]) -> Option<i64> {
    digits.iter().all(u8::is_ascii_digit).then(|| digits.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
}

/// Seconds since the epoch of `YYYY-MM-DDTHH:MM:SS` read as UTC, `None` when it is no such
/// date and time.
fn date_time_seconds(t: &[u8; 19]) -> Option<i64> {
    let num = |range: std::ops::Range<usize>| digits(&t[range]);
    let sep = |i: usize, c: u8| t[i].eq_ignore_ascii_case(&c);
    if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month) || hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_timestamps_pass_as_written_and_lower_case_is_raised() {
        for t in ["2026-11-22T03:16:40.123456789Z", "2026-11-22T03:16:40Z", "2024-02-29T23:59:59.5+05:30", "1970-01-01T00:00:00Z"] {
            assert_eq!(classify(t.as_bytes()), Stamp::Valid(Cow::Borrowed(t.as_bytes())), "{t}");
        }
        assert_eq!(classify(b"2026-11-22t03:16:40.5z"), Stamp::Valid(Cow::Owned(b"2026-11-22T03:16:40.5Z".to_vec())));
    }

    #[test]
    fn impossible_zoneless_and_out_of_range_timestamps_are_unusable() {
        for t in [
            "2024-13-45T99:99:99Z",
            "2023-02-29T00:00:00Z",
            "2026-11-22T24:00:00Z",
            "2026-11-22T23:59:60Z",
            "2026-11-22T03:16:40",
            "2026-11-22T03:16:40.123",
            "2026-11-22T03:16:40.Z",
            "2026-11-22T03:16:40.1234567890Z",
            "2026-11-22T03:16:40+25:00",
            "2026-11-22T03:16:40+0100",
            "1969-12-31T23:59:59Z",
            "2262-04-12T00:00:00Z",
            "2026-11-22T03:16:40ZZ",
        ] {
            assert_eq!(classify(t.as_bytes()), Stamp::Unusable, "{t}");
        }
    }

    #[test]
    fn nul_bytes_never_pass_for_the_second_not_yet_seen() {
        // A fresh thread: no second seen yet, and NUL bytes read as the mark for none.
        std::thread::spawn(|| {
            let mut t = [0u8; 30];
            t[19..].copy_from_slice(b".123456789Z");
            assert_eq!(classify(&t), Stamp::NotTimestamp);
            assert_eq!(unix_nanos(&t), None);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn lines_within_a_known_second_are_checked_as_closely_as_the_first() {
        assert_eq!(classify(b"2026-11-22T03:16:40.123456789Z"), Stamp::Valid(Cow::Borrowed(&b"2026-11-22T03:16:40.123456789Z"[..])));
        for t in ["2026-11-22T03:16:40.12345678xZ", "2026-11-22T03:16:40.123456789z", "2026-11-22T03:16:40.1234567890Z"] {
            assert_ne!(classify(t.as_bytes()), Stamp::Valid(Cow::Borrowed(t.as_bytes())), "{t}");
        }
        assert_eq!(classify(b"2026-11-22T03:16:40.999999999Z"), Stamp::Valid(Cow::Borrowed(&b"2026-11-22T03:16:40.999999999Z"[..])));
        // The last second Elasticsearch stores is never taken as a known second.
        assert_eq!(classify(b"2262-04-11T23:47:16.000000000Z"), Stamp::Valid(Cow::Borrowed(&b"2262-04-11T23:47:16.000000000Z"[..])));
        assert_eq!(classify(b"2262-04-11T23:47:16.900000000Z"), Stamp::Unusable);
        // A second read with an offset is not remembered: it is another second in UTC.
        assert_eq!(classify(b"2262-04-12T00:47:15.5+01:00"), Stamp::Valid(Cow::Borrowed(&b"2262-04-12T00:47:15.5+01:00"[..])));
        assert_eq!(classify(b"2262-04-12T00:47:15.000000000Z"), Stamp::Unusable);
        assert_eq!(classify(&[0; 30]), Stamp::NotTimestamp);
        // A lower-case one is raised, and its second not remembered as written.
        assert_eq!(classify(b"2026-11-22t03:16:41.5Z"), Stamp::Valid(Cow::Owned(b"2026-11-22T03:16:41.5Z".to_vec())));
        assert_eq!(classify(b"2026-11-22t03:16:41.000000001Z"), Stamp::Valid(Cow::Owned(b"2026-11-22T03:16:41.000000001Z".to_vec())));
    }

    /// The runtimes' nine fraction digits read at once give what reading them one by one
    /// gives, and anything but nine digits there is not the runtimes' form.
    #[test]
    fn fractions_of_the_runtimes_form_are_read_digit_for_digit() {
        let one_by_one = |d: &str| d.bytes().fold(0u32, |n, b| n * 10 + u32::from(b - b'0'));
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let random = std::iter::repeat_with(|| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            format!("{:09}", state % 1_000_000_000)
        });
        let fixed = ["000000000", "999999999", "123456789", "987654321", "000000001", "100000000", "090807060"].map(String::from);
        for digits in fixed.into_iter().chain(random.take(2000)) {
            let t = format!("2026-11-22T03:16:40.{digits}Z");
            assert_eq!(runtime_fraction(t.as_bytes()), Some(one_by_one(&digits)), "{t}");
        }
        for bad in [b"12345678:", b"1234567/9", b":23456789", b"/23456789", b"1234 6789", b"12345678a", b"\xff23456789", b"1234\xf95678"] {
            let t = [&b"2026-11-22T03:16:40."[..], bad, b"Z"].concat();
            assert_eq!(runtime_fraction(&t), None, "{}", String::from_utf8_lossy(&t));
        }
        for other in ["2026-11-22T03:16:40.123456789", "2026-11-22T03:16:40.12345678Z", "2026-11-22T03:16:40,123456789Z"] {
            assert_eq!(runtime_fraction(other.as_bytes()), None, "{other}");
        }
    }

    #[test]
    fn other_text_is_not_a_timestamp() {
        for t in ["yesterday", "2026-11-22 03:16:40Z", "2026-11-22T03:16:40\"Z", "", "2026-11-22T03:16:40Z; drop"] {
            assert_eq!(classify(t.as_bytes()), Stamp::NotTimestamp, "{t}");
        }
    }

    #[test]
    fn timestamps_read_in_a_row_read_as_each_does_alone() {
        let row: [&[u8]; 13] = [
            b"2026-11-22T03:16:40.123456789Z",
            b"2026-11-22T03:16:40.5+02:00",
            b"2026-11-22T03:16:40Z",
            b"2026-11-22t03:16:40.000000001z",
            b"2026-02-30T03:16:40.000000001Z",
            b"2026-02-30T03:16:40.000000001Z",
            b"2026-11-22T03:16:40.12345678xZ",
            b"2026-11-22T03:16:41.000000000Z",
            b"2026-11-22T03:16:40.999999999Z",
            b"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0.000000000Z",
            b"not a time",
            b"",
            b"1969-12-31T23:59:59.999999999Z",
        ];
        let mut seconds = Seconds::default();
        // In three orders (steps coprime to the row's length visit every timestamp once), by a
        // caller's own `Seconds` and by the thread's. The impossible date comes twice in a row
        // (in the first order): its second reading must not find a second stored by the first.
        for step in [1, 5, 7] {
            for i in 0..row.len() {
                let t = row[i * step % row.len()];
                let alone = Seconds::default().unix_nanos(t);
                assert_eq!(seconds.unix_nanos(t), alone, "step {step}: {}", String::from_utf8_lossy(t));
                assert_eq!(unix_nanos(t), alone, "the thread's, step {step}: {}", String::from_utf8_lossy(t));
            }
        }
    }

    #[test]
    fn nanoseconds_count_from_the_epoch_with_offsets() {
        assert_eq!(unix_nanos(b"1970-01-01T00:00:01.000000042Z"), Some(1_000_000_042));
        // The second just read is remembered: what follows it is still checked.
        assert_eq!(unix_nanos(b"1970-01-01T00:00:01.5Z"), Some(1_500_000_000));
        assert_eq!(unix_nanos(b"1970-01-01T00:00:01+01:00"), Some(1_000_000_000 - 3_600_000_000_000));
        assert_eq!(unix_nanos(b"1970-01-01T00:00:01.Z"), None);
        assert_eq!(unix_nanos(b"1970-01-01T00:00:01"), None, "no zone");
        assert_eq!(unix_nanos(b"1970-02-30T00:00:01Z"), None, "an impossible date after a valid one");
        assert_eq!(unix_nanos(b"1970-01-01T00:00:01Z"), Some(1_000_000_000));
        assert_eq!(unix_nanos(b"2026-11-22T03:16:40.123456789Z"), Some(1_795_317_400_123_456_789));
        // The runtimes' form, read directly, agrees with the general reading of the same instant.
        assert_eq!(unix_nanos(b"2262-04-11T23:47:16.854775807Z"), Some(i128::from(i64::MAX)));
        assert_eq!(unix_nanos(b"2026-11-22T03:16:40.123456789Z"), unix_nanos(b"2026-11-22T03:16:40.123456789+00:00"));
        assert_eq!(unix_nanos(b"2026-11-22T03:16:40.000000001z"), unix_nanos(b"2026-11-22T03:16:40.000000001Z"));
        assert_eq!(unix_nanos(b"2026-11-22T03:16:40.12345678xZ"), None);
        assert_eq!(unix_nanos(b"2026-11-22T05:16:40.123456789+02:00"), Some(1_795_317_400_123_456_789));
        assert_eq!(unix_nanos(b"2026-11-21T22:46:40.5-04:30"), Some(1_795_317_400_500_000_000));
    }
}
