//! The access log's JSON line, written in one pass (`PERMGATE_LOG_FORMAT=json`).
//!
//! Every request logs one event on target [`TARGET`]. tracing-subscriber's JSON formatter spent
//! about as many instructions on that line as the rest of a cache hit (a serde map serializer
//! over an `io::Write` adaptor that re-validates UTF-8 for every piece it is handed).
//! [`AccessJson`] writes that event's line itself in one pass, in exactly the shape
//! tracing-subscriber 0.3 emits, `{"timestamp":"…","level":"INFO","fields":{…},"target":"…"}`
//! (same field order, escapes and number formats), and hands every other event to the JSON
//! formatter it wraps. The tests compare both formatters' lines byte for byte.

use std::cell::RefCell;
use std::fmt::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The access event's target (`proxy::respond`).
pub const TARGET: &str = "permgate::access";

/// Formats events on [`TARGET`] itself and every other event with `rest`, which is meant to be
/// tracing-subscriber's JSON format with its default fields (timestamp, level, fields, target)
/// and without a span list, as `observability::init` builds it.
pub struct AccessJson<F> {
    rest: F,
}

impl<F> AccessJson<F> {
    pub fn new(rest: F) -> AccessJson<F> {
        AccessJson { rest }
    }
}

impl<S, N, F> FormatEvent<S, N> for AccessJson<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // Inside a span this layer renders, the JSON format adds a "span" object; leave such an
        // event to it. permgate's own spans are never rendered (`observability::renders`), so
        // the access event normally takes the short way.
        if event.metadata().target() != TARGET
            || event
                .parent()
                .and_then(|id| ctx.span(id))
                .or_else(|| ctx.lookup_current())
                .is_some()
        {
            return self.rest.format_event(ctx, writer, event);
        }
        let now = SystemTime::now();
        // Built in a buffer of this thread (each piece an inlined copy rather than a call
        // through the `Writer`), then handed over at once.
        let written = LINE.try_with(|line| {
            let mut line = line.try_borrow_mut().ok()?;
            line.clear();
            let result = write_line(&mut line, event, now).and_then(|()| writer.write_str(&line));
            if line.capacity() > LINE_KEPT {
                *line = String::new();
            }
            Some(result)
        });
        if let Ok(Some(result)) = written {
            return result;
        }
        let mut line = String::new();
        write_line(&mut line, event, now)?;
        writer.write_str(&line)
    }
}

/// The most a line buffer keeps between events.
const LINE_KEPT: usize = 16 * 1024;

thread_local! {
    static LINE: RefCell<String> = const { RefCell::new(String::new()) };
}

/// One JSON line for `event`, as tracing-subscriber's JSON format writes it at `now`. Fails
/// only when a field's `Debug` implementation does (then so does the JSON format).
fn write_line(out: &mut String, event: &Event<'_>, now: SystemTime) -> fmt::Result {
    let meta = event.metadata();
    out.push_str("{\"timestamp\":\"");
    write_timestamp(out, now)?;
    out.push_str(match *meta.level() {
        Level::TRACE => "\",\"level\":\"TRACE\",\"fields\":{",
        Level::DEBUG => "\",\"level\":\"DEBUG\",\"fields\":{",
        Level::INFO => "\",\"level\":\"INFO\",\"fields\":{",
        Level::WARN => "\",\"level\":\"WARN\",\"fields\":{",
        Level::ERROR => "\",\"level\":\"ERROR\",\"fields\":{",
    });
    let mut fields = JsonFields {
        out: &mut *out,
        first: true,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    out.push_str("},\"target\":\"");
    write_escaped(out, meta.target());
    out.push_str("\"}\n");
    Ok(())
}

/// The first second tracing-subscriber writes with a five-digit year (10000-01-01), which
/// humantime does not format.
const YEAR_10000: u64 = 253_402_300_800;

thread_local! {
    /// The second last formatted on this thread and its `YYYY-MM-DDTHH:MM:SS.`.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

/// `now` as tracing-subscriber's default timer writes it: RFC 3339 in UTC with microseconds,
/// `2025-01-31T12:34:56.789012Z`. The date and time of day come from humantime (as in
/// `audit::now_rfc3339`), formatted once per second per thread; outside humantime's range
/// (before 1970, after 9999) tracing-subscriber's timer writes the current time itself.
fn write_timestamp(out: &mut String, now: SystemTime) -> fmt::Result {
    if let Ok(since) = now.duration_since(UNIX_EPOCH) {
        let secs = since.as_secs();
        if secs < YEAR_10000 {
            let written = SECOND.try_with(|second| {
                let mut second = second.try_borrow_mut().ok()?;
                let (at, text) = &mut *second;
                if *at != secs {
                    *at = u64::MAX;
                    text.clear();
                    write!(text, "{}", humantime::format_rfc3339_seconds(now)).ok()?;
                    if text.pop() != Some('Z') {
                        return None;
                    }
                    text.push('.');
                    *at = secs;
                }
                out.push_str(text);
                Some(())
            });
            if let Ok(Some(())) = written {
                // Six digits, zero-padded: the last six of 1uuuuuu.
                let mut digits = itoa::Buffer::new();
                let micros = digits.format(1_000_000 + since.subsec_micros());
                out.push_str(micros.get(1..).unwrap_or("000000"));
                out.push('Z');
                return Ok(());
            }
        }
    }
    tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(out))
}

/// Records fields as the members of a JSON object (without its braces), as tracing-serde does:
/// strings and `Debug`/`Display` values as strings, integers and booleans as such, finite
/// floats as numbers and the others as `null`. A failing `Debug` implementation stops it.
struct JsonFields<'a> {
    out: &'a mut String,
    first: bool,
    result: fmt::Result,
}

impl JsonFields<'_> {
    /// Starts the member `field` (`"name":`).
    fn key(&mut self, field: &Field) -> &mut String {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        self.out.push('"');
        write_escaped(self.out, field.name());
        self.out.push('"');
        self.out.push(':');
        self.out
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        let out = self.key(field);
        out.push('"');
        write_escaped(out, value);
        out.push('"');
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.key(field).push_str(itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.key(field).push_str(itoa::Buffer::new().format(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        let out = self.key(field);
        if value.is_finite() {
            out.push_str(zmij::Buffer::new().format_finite(value));
        } else {
            out.push_str("null");
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.key(field)
            .push_str(if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let out = self.key(field);
        out.push('"');
        let written = write!(Escaping(&mut *out), "{value:?}");
        out.push('"');
        if self.result.is_ok() {
            self.result = written;
        }
    }
}

/// Escapes everything written through it into the JSON string being written.
struct Escaping<'a>(&'a mut String);

impl Write for Escaping<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        write_escaped(self.0, s);
        Ok(())
    }
}

/// The escapes of U+0000 to U+001F, as serde_json writes them.
const CONTROL: [&str; 32] = [
    "\\u0000", "\\u0001", "\\u0002", "\\u0003", "\\u0004", "\\u0005", "\\u0006", "\\u0007", "\\b",
    "\\t", "\\n", "\\u000b", "\\f", "\\r", "\\u000e", "\\u000f", "\\u0010", "\\u0011", "\\u0012",
    "\\u0013", "\\u0014", "\\u0015", "\\u0016", "\\u0017", "\\u0018", "\\u0019", "\\u001a",
    "\\u001b", "\\u001c", "\\u001d", "\\u001e", "\\u001f",
];

/// Appends `s` as the inside of a JSON string: `"`, `\` and control characters escaped,
/// everything else (non-ASCII included) as it is. Runs without escapes are copied whole, and
/// checked eight bytes at a time.
fn write_escaped(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    let mut unwritten = 0; // bytes before it are in `out`
    let mut i = 0; // bytes before it are checked
    while i < bytes.len() {
        if let Some(word) = bytes[i..].first_chunk::<8>() {
            if !any_to_escape(u64::from_le_bytes(*word)) {
                i += 8;
                continue;
            }
        } else if let Some(last) = bytes.last_chunk::<8>() {
            // Under eight left: if the last eight bytes are all clean, so is the rest.
            if !any_to_escape(u64::from_le_bytes(*last)) {
                break;
            }
        }
        let b = bytes[i];
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0..=0x1f => CONTROL[usize::from(b)],
            _ => {
                i += 1;
                continue;
            }
        };
        // Both ends sit next to an ASCII byte, so on character boundaries.
        out.push_str(&s[unwritten..i]);
        out.push_str(escape);
        i += 1;
        unwritten = i;
    }
    out.push_str(&s[unwritten..]);
}

/// Whether any of the eight bytes of `word` is `"`, `\` or a control character (below 0x20).
/// Exact, as in "Bit Twiddling Hacks" (determine if a word has a zero byte / a byte less
/// than n): a byte below n, with n at most 0x80, borrows into its own high bit.
fn any_to_escape(word: u64) -> bool {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGHS: u64 = ONES * 0x80;
    let below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x;
    let control = below(word, 0x20);
    let quote = below(word ^ (ONES * u64::from(b'"')), 1);
    let backslash = below(word ^ (ONES * u64::from(b'\\')), 1);
    (control | quote | backslash) & HIGHS != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use tracing_subscriber::fmt::MakeWriter;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }

    /// What `emit` logs, formatted by tracing-subscriber's JSON format as `observability::init`
    /// configures it, with the access formatter in front of it or not.
    fn lines(fast: bool, emit: impl FnOnce()) -> Vec<String> {
        use tracing_subscriber::layer::SubscriberExt;
        let out = Capture::default();
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(out.clone())
            .json()
            .with_current_span(true)
            .with_span_list(false);
        let subscriber = tracing_subscriber::registry();
        if fast {
            let layer = layer.map_event_format(AccessJson::new);
            tracing::subscriber::with_default(subscriber.with(layer), emit);
        } else {
            tracing::subscriber::with_default(subscriber.with(layer), emit);
        }
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.ends_with('\n'), "{text:?}");
        text.lines().map(str::to_string).collect()
    }

    /// The line with its timestamp's value (`{"timestamp":"` then 27 characters) blanked.
    fn without_time(line: &str) -> String {
        let head = "{\"timestamp\":\"";
        assert!(line.starts_with(head), "{line}");
        let time = &line[head.len()..head.len() + 27];
        assert!(humantime::parse_rfc3339(time).is_ok(), "{time}");
        assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
        format!("{head}{}", &line[head.len() + 27..])
    }

    /// Both formatters give the same lines for what `emit` logs, timestamps aside.
    fn same_lines(emit: impl Fn()) -> Vec<serde_json::Value> {
        let fast = lines(true, &emit);
        let stock = lines(false, &emit);
        assert_eq!(fast.len(), stock.len());
        for (f, s) in fast.iter().zip(&stock) {
            assert_eq!(without_time(f), without_time(s));
            let mut f: serde_json::Value = serde_json::from_str(f).unwrap();
            let mut s: serde_json::Value = serde_json::from_str(s).unwrap();
            f["timestamp"].take();
            s["timestamp"].take();
            assert_eq!(f, s);
        }
        fast.iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    const NASTY: &str =
        "q\"uote b\\ack /slash \n\r\t\u{8}\u{c}\u{0}\u{1}\u{1f}\u{7f} é ✓ 😀 \u{2028}";

    #[test]
    fn the_access_line_is_the_json_formats_line() {
        let client: Option<&str> = None;
        let upstream_status: Option<u16> = None;
        let lines = same_lines(|| {
            tracing::info!(
                target: "permgate::access",
                request_id = "req_0123456789abcdef0123456789abcdef",
                method = "GET",
                client = Some("reader"),
                route = Some("list_permissions"),
                checkpoint = Some("ft:gpt-4o-mini-2024-07-18:acme:weather:B7R9VjQd"),
                cache_status = Some("hit"),
                status = 200u16,
                duration_ms = 0.123_f64,
                upstream_status = Some(200u16),
                "request"
            );
            // Optional fields that are None are not recorded, so absent.
            tracing::info!(
                target: "permgate::access",
                request_id = "req_x",
                method = "GET",
                client,
                status = 401u16,
                duration_ms = 12.0_f64,
                upstream_status,
                "request"
            );
        });
        assert_eq!(lines.len(), 2);
        let fields = &lines[0]["fields"];
        assert_eq!(fields["message"], "request");
        assert_eq!(fields["status"], 200);
        assert_eq!(fields["duration_ms"], 0.123);
        assert_eq!(fields["upstream_status"], 200);
        assert_eq!(lines[0]["target"], TARGET);
        assert_eq!(lines[0]["level"], "INFO");
        let absent = lines[1]["fields"].as_object().unwrap();
        assert!(!absent.contains_key("client") && !absent.contains_key("upstream_status"));
        assert!(absent.contains_key("duration_ms"));
    }

    #[test]
    fn every_kind_of_value_and_awkward_strings_match() {
        let lines = same_lines(|| {
            tracing::warn!(
                target: "permgate::access",
                text = NASTY,
                debug = ?NASTY,
                display = %NASTY,
                list = ?vec!["a\"b", "ü"],
                negative = -42i64,
                big = u64::MAX,
                small = i64::MIN,
                wide = u128::MAX,
                yes = true,
                no = false,
                nan = f64::NAN,
                inf = f64::INFINITY,
                tiny = 5e-324_f64,
                huge = 1e300_f64,
                round = 1e16_f64,
                minus_zero = -0.0_f64,
                "{NASTY}"
            );
            tracing::error!(target: "permgate::access", "only a message");
            tracing::debug!(target: "permgate::access", n = 1u64);
            tracing::event!(target: "permgate::access", Level::TRACE, dotted.name = "v", "message");
        });
        assert_eq!(lines[0]["fields"]["text"], NASTY);
        assert_eq!(lines[0]["fields"]["message"], NASTY);
        assert_eq!(lines[0]["fields"]["display"], NASTY);
        assert_eq!(lines[0]["fields"]["debug"], format!("{NASTY:?}"));
        assert_eq!(lines[0]["fields"]["nan"], serde_json::Value::Null);
        assert_eq!(lines[0]["level"], "WARN");
        assert_eq!(lines[2]["fields"], serde_json::json!({"n": 1}));
    }

    #[test]
    fn other_events_and_access_events_inside_a_rendered_span_are_left_to_the_json_format() {
        same_lines(|| {
            tracing::info!(target: "permgate::fleet", addr = "127.0.0.1:1", "redis \"up\"");
            tracing::info!(target: "permgate::access_more", "not the access target");
            let span = tracing::info_span!(target: "other", "outer", id = 7u64);
            let _entered = span.enter();
            tracing::info!(target: "permgate::access", status = 200u16, "request");
            tracing::warn!(target: "permgate::upstream", "inside");
        });
        let fast = lines(true, || {
            let span = tracing::info_span!(target: "other", "outer", id = 7u64);
            span.in_scope(|| tracing::info!(target: "permgate::access", "request"));
        });
        let line: serde_json::Value = serde_json::from_str(&fast[0]).unwrap();
        assert_eq!(line["span"], serde_json::json!({"id": 7, "name": "outer"}));
    }

    /// Writes `rest` for each event it is handed: shows which events `AccessJson` passes on.
    struct Rest;

    impl<S, N> FormatEvent<S, N> for Rest
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'w> FormatFields<'w> + 'static,
    {
        fn format_event(
            &self,
            _: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            _: &Event<'_>,
        ) -> fmt::Result {
            writer.write_str("rest\n")
        }
    }

    /// Wants every span, as the OpenTelemetry layer does.
    struct Everything;

    impl<S: Subscriber> tracing_subscriber::Layer<S> for Everything {}

    #[test]
    fn the_access_event_inside_permgates_own_spans_takes_the_short_way() {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::Layer;
        let out = Capture::default();
        // As `observability::init` builds it, with OpenTelemetry export on.
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(out.clone())
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .map_event_format(|_| AccessJson::new(Rest))
            .with_filter(tracing_subscriber::filter::filter_fn(
                crate::observability::renders,
            ));
        let subscriber = tracing_subscriber::registry().with(Everything).with(fmt);
        tracing::subscriber::with_default(subscriber, || {
            let request = tracing::info_span!(target: "permgate::proxy", "request", id = 1u64);
            assert!(!request.is_disabled());
            tracing::info!(target: "permgate::access", parent: &request, "request");
            request.in_scope(|| tracing::info!(target: "permgate::access", "request"));
            let other = tracing::info_span!(target: "other", "outer");
            other.in_scope(|| tracing::info!(target: "permgate::access", "request"));
            tracing::info!(target: "permgate::fleet", "elsewhere");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        for line in &lines[..2] {
            let line: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(line["fields"], serde_json::json!({"message": "request"}));
            assert!(line.get("span").is_none());
        }
        assert_eq!(lines[2..], ["rest", "rest"]);
    }

    fn at(secs: u64, micros: u32) -> String {
        let mut out = String::new();
        let time = UNIX_EPOCH + Duration::new(secs, micros * 1000 + 999);
        write_timestamp(&mut out, time).unwrap();
        out
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(at(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(951_782_400, 500_000), "2000-02-29T00:00:00.500000Z");
        assert_eq!(at(1_700_000_000, 1), "2023-11-14T22:13:20.000001Z");
        // The same second again, the next one, and an earlier one: the cache follows.
        assert_eq!(at(1_700_000_000, 999_999), "2023-11-14T22:13:20.999999Z");
        assert_eq!(at(1_700_000_001, 0), "2023-11-14T22:13:21.000000Z");
        assert_eq!(at(1_700_000_000, 42), "2023-11-14T22:13:20.000042Z");
        assert_eq!(at(YEAR_10000 - 1, 999_999), "9999-12-31T23:59:59.999999Z");
        // Out of humantime's range: tracing-subscriber's timer writes the current time.
        let mut out = String::new();
        write_timestamp(&mut out, UNIX_EPOCH - Duration::from_secs(1)).unwrap();
        assert!(humantime::parse_rfc3339(&out).is_ok(), "{out}");
        assert_eq!(out.len(), 27);
    }

    #[test]
    fn every_ascii_character_is_escaped_as_serde_json_does() {
        let all: String = (0..=0x7f_u8)
            .map(char::from)
            .chain(['é', '\u{2028}'])
            .collect();
        for s in all.chars().map(String::from).chain([all.clone()]) {
            let mut out = String::new();
            write_escaped(&mut out, &s);
            assert_eq!(format!("\"{out}\""), serde_json::to_string(&s).unwrap());
        }
    }

    #[test]
    fn the_word_test_finds_exactly_the_bytes_to_escape() {
        let naive = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        for filler in [b' ', b'!', b'#', b'A', b']', 0x7f, 0x80, 0xff] {
            for at in 0..8 {
                for b in 0..=255u8 {
                    let mut word = [filler; 8];
                    word[at] = b;
                    assert_eq!(
                        any_to_escape(u64::from_le_bytes(word)),
                        naive(b),
                        "{word:?}"
                    );
                }
            }
        }
    }

    /// Strings mostly of characters that matter to the escaper, long enough for its word steps.
    fn awkward() -> impl Strategy<Value = String> {
        let chars = vec![
            '"', '\\', '\n', '\u{0}', '\u{1f}', ' ', 'a', '\u{7f}', 'é', '😀',
        ];
        prop::collection::vec(prop::sample::select(chars), 0..64)
            .prop_map(|c| c.into_iter().collect())
    }

    proptest! {
        #[test]
        fn word_steps_agree_with_bytes(word in any::<[u8; 8]>()) {
            let naive = word.iter().any(|&b| b < 0x20 || b == b'"' || b == b'\\');
            prop_assert_eq!(any_to_escape(u64::from_le_bytes(word)), naive);
        }

        #[test]
        fn awkward_strings_are_escaped_as_serde_json_does(s in awkward()) {
            let mut out = String::from("\"");
            write_escaped(&mut out, &s);
            out.push('"');
            prop_assert_eq!(&out, &serde_json::to_string(&s).unwrap());
        }

        #[test]
        fn escaped_strings_are_what_serde_json_writes(s in any::<String>()) {
            let mut out = String::from("\"");
            write_escaped(&mut out, &s);
            out.push('"');
            prop_assert_eq!(&out, &serde_json::to_string(&s).unwrap());
            prop_assert_eq!(serde_json::from_str::<String>(&out).unwrap(), s);
        }

        #[test]
        fn timestamps_agree_with_humantime(secs in 0..YEAR_10000, micros in 0..1_000_000u32) {
            let time = UNIX_EPOCH + Duration::new(secs, micros * 1000);
            prop_assert_eq!(at(secs, micros), humantime::format_rfc3339_micros(time).to_string());
        }
    }
}
