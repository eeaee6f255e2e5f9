//! Ambiguous request framing is refused at the front door (SPEC "The front door: TLS, caller
//! identity, framing"): an HTTP/1 request with both `Content-Length` and `Transfer-Encoding`,
//! or with a `Transfer-Encoding` other than exactly `chunked`, is answered 400 and its
//! connection closed before hyper has parsed it, so no handler runs and nothing of it reaches
//! upstream, whoever sent it. So is a `Content-Length` that is not one decimal number (or
//! disagrees with another; 400), and a head still incomplete at hyper's buffer size
//! (`server.max_header_bytes`; 431).
//!
//! Why below hyper: hyper 1.x settles the ambiguity itself before a request exists. Its
//! `Server::parse` skips a `Content-Length` that follows `Transfer-Encoding`, removes one that
//! came before, and only turns keep-alive off; it accepts any `Transfer-Encoding` whose last
//! coding is `chunked`. Nothing public keeps the head as it arrived, so [`FramingGuard`] reads
//! the bytes on their way in, under hyper-util's auto server (plain TCP, or TLS once the
//! handshake is done).
//!
//! How: the guard follows the HTTP/1 message boundaries of the stream with `httparse` (the
//! parser hyper uses, configured at least as leniently, so every head hyper could complete the
//! guard completes too) and the same chunked grammar as hyper's decoder, so it always knows
//! where the next head starts. A head's bytes are passed to hyper as they arrive, except the
//! read that completes it (or that would fill hyper's buffer), which is checked first: a
//! refused head therefore never becomes a request. Its answer (OpenAI's JSON error, the
//! caller's `x-request-id` if it sent a sane one, `Connection: close`) is written only after
//! every earlier request on the connection has been answered, which the guard knows by
//! following the response framing hyper writes; then the connection's write side is shut and
//! what the client still sends is discarded for up to [`LINGER`], so the answer is not lost to
//! a reset.
//!
//! "Exactly `chunked`": one `Transfer-Encoding` field line, on HTTP/1.1, whose value (after
//! the optional whitespace around a field value) is `chunked` in any letter case, and no
//! `Content-Length`. A list (`gzip, chunked`, `chunked, chunked`), parameters, other codings,
//! an empty value and a second line are all refused.
//!
//! Heads hyper refuses while parsing them (a malformed line, which the guard hands over with
//! nothing after it; a line the guard's leniency skips but hyper's parser does not; more than
//! 100 fields; a request-target `http::Uri` refuses) hyper answers itself: 400, 414 or 431
//! with no body and no request id, then it closes. The guard recognises that answer as it is
//! written (at the start of an answer, a 400/414/431 with no body, no `content-type` and no
//! `x-request-id`: permgate's own answers always have a request id or a JSON body) and writes
//! permgate's JSON error in its place, with the caller's `x-request-id` when the guard read the
//! head whole (more than 100 fields) and a new one otherwise, then lingers as for its own
//! refusals, so every answer has the SPEC's shape.
//!
//! HTTP/2 (the connection preface) passes untouched: it has no such framing, and h2 refuses
//! `transfer-encoding` in a request. Refusals are logged (`request_id`, `reason`) and counted
//! in `permgate_framing_refusals_total{reason}`; they are not in the access log or the request
//! metrics, which belong to requests, and this never became one.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use hyper::header::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tracing::{debug, info};

use crate::error::Error;
use crate::head_timer::HeadTimer;
use crate::metrics::Metrics;
use crate::observability;

/// How long a refused connection keeps reading (and discarding) after its answer, so that
/// bytes the client is still sending do not turn the close into a reset that destroys it.
pub const LINGER: Duration = Duration::from_secs(1);

/// hyper-util's HTTP/2 detection: a connection that starts with this is HTTP/2.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// hyper's default; heads with more are parsed again with room for every line.
const MAX_HEADERS: usize = 100;
/// hyper refuses larger lengths (its `MAX_LEN`).
const MAX_LENGTH: u64 = u64::MAX - 2;

/// A connection's byte stream with HTTP/1 request framing checked on the way in. See the
/// module documentation.
pub struct FramingGuard<IO> {
    io: IO,
    scanner: Scanner,
    /// `server.header_read_timeout_ms` for each head awaited.
    head_timer: HeadTimer,
    state: State,
    /// The reader, while a refusal waits for the earlier requests' answers to be written.
    waiting: Option<Waker>,
    /// Where refusals are counted (`permgate_framing_refusals_total`).
    metrics: Option<Arc<Metrics>>,
}

#[derive(Debug)]
enum State {
    Open,
    /// hyper has what it needs to refuse the last head itself; it gets no further byte.
    Doomed,
    /// A refused head was withheld; its answer waits for every earlier answer.
    Refusing {
        refusal: Refusal,
        id: HeaderValue,
    },
    /// Writing the refusal's answer, then shutting the write side.
    Answering {
        response: Vec<u8>,
        written: usize,
    },
    /// Discarding what the client still sends, until it closes or the deadline passes.
    Lingering(Pin<Box<Sleep>>),
    Closed,
}

impl<IO> FramingGuard<IO> {
    /// `max_head`: hyper's HTTP/1 read buffer limit (`max_buf_size`). A head still incomplete
    /// at that size is refused (431) before hyper holds that much of it.
    /// `header_read_timeout`: how long a head awaited may take (see [`HeadTimer`]).
    /// `metrics`: where refusals are counted, if anywhere.
    pub fn new(
        io: IO,
        max_head: usize,
        header_read_timeout: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> FramingGuard<IO> {
        FramingGuard {
            io,
            scanner: Scanner::new(max_head),
            head_timer: HeadTimer::new(header_read_timeout),
            state: State::Open,
            waiting: None,
            metrics,
        }
    }

    /// Feeds what was written to the response tracking, and wakes a waiting refusal once
    /// nothing is left unanswered.
    fn wrote(&mut self, data: &[u8]) {
        self.scanner.on_write(data);
        if self.waiting.is_some() && !matches!(self.scanner.unanswered(), Some(n) if n > 0) {
            if let Some(waker) = self.waiting.take() {
                waker.wake();
            }
        }
    }

    /// Logs and counts a refusal.
    fn record_refusal(&self, refusal: Refusal, id: &HeaderValue) {
        info!(
            request_id = id.to_str().unwrap_or_default(),
            reason = refusal.reason(),
            "request head refused at the front door; closing the connection"
        );
        if let Some(metrics) = &self.metrics {
            metrics.framing_refused(refusal.label());
        }
    }

    /// hyper answering a head it could not parse (`data` starts its answer, see
    /// [`Scanner::hyper_refusal`]): the guard writes permgate's answer for it instead, with
    /// the caller's request id when the guard read one from that head. hyper ends the
    /// connection after it, so a refusal the guard still withholds behind that head is never
    /// answered.
    fn substitute(&mut self, data: &[u8]) {
        if !matches!(
            self.state,
            State::Open | State::Doomed | State::Refusing { .. }
        ) {
            return;
        }
        if let Some(refusal) = self.scanner.hyper_refusal(data) {
            self.waiting = None;
            let id = observability::request_id(self.scanner.unparsed_id_of_next_answer().as_ref());
            self.record_refusal(refusal, &id);
            self.state = State::Answering {
                response: refusal_response(refusal, &id),
                written: 0,
            };
        }
    }

    /// hyper's writes are refused once the guard has taken the connection over.
    fn taken_over(&self) -> bool {
        matches!(
            self.state,
            State::Answering { .. } | State::Lingering(_) | State::Closed
        )
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> FramingGuard<IO> {
    /// One read from the client, checked. `Ok(true)`: hand `buf` to hyper; `Ok(false)`: the
    /// state changed with nothing to hand over.
    fn read_open(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<bool>> {
        let before = buf.filled().len();
        if Pin::new(&mut self.io).poll_read(cx, buf)?.is_pending() {
            return self.poll_head_timeout(cx);
        }
        let deliver = match self.scanner.on_read(&buf.filled()[before..]) {
            Verdict::Pass => return Poll::Ready(Ok(true)),
            Verdict::Doom { deliver } => {
                self.state = State::Doomed;
                deliver
            }
            Verdict::Refuse { deliver, refusal } => {
                let id = observability::request_id(self.scanner.refused_request_id.take().as_ref());
                self.record_refusal(refusal, &id);
                self.state = State::Refusing { refusal, id };
                deliver
            }
        };
        buf.set_filled(before + deliver);
        Poll::Ready(Ok(deliver > 0))
    }

    /// Once the last answer is written, the wait for the next head starts. hyper reads again
    /// only when its task is woken, so the timer is armed here, with the connection task's
    /// waker, to wake it when the wait is over.
    fn start_head_timer(&mut self, cx: &mut Context<'_>) {
        if let Some(head) = self.scanner.awaited_head() {
            if self.head_timer.start(head, cx).is_ready() {
                cx.waker().wake_by_ref();
            }
        }
    }

    /// Nothing to read: while a head is awaited, the connection fails once it has waited for
    /// the header read timeout (hyper then closes it).
    fn poll_head_timeout(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let Some(head) = self.scanner.awaited_head() else {
            return Poll::Pending;
        };
        ready!(self.head_timer.poll_expired(head, cx));
        debug!("no complete request head within the header read timeout; closing the connection");
        self.state = State::Closed;
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "no complete request head within the header read timeout",
        )))
    }

    /// A refusal's turn comes once every earlier request is answered. If the answers could
    /// not be followed (an upgrade, a response without a length), the connection is closed
    /// without an answer rather than risk one in the middle of another.
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let State::Refusing { refusal, id } = &self.state else {
            return Poll::Ready(());
        };
        self.state = match self.scanner.unanswered() {
            Some(0) => State::Answering {
                response: refusal_response(*refusal, id),
                written: 0,
            },
            None => State::Closed,
            Some(_) => {
                self.waiting = Some(cx.waker().clone());
                return Poll::Pending;
            }
        };
        Poll::Ready(())
    }

    /// A write of hyper's while the guard answers: hyper's `len` bytes are taken (and dropped)
    /// once the guard's answer is written. The lingering that follows runs in `poll_shutdown`,
    /// which hyper calls next as it ends the connection.
    fn poll_answer_for_hyper(
        &mut self,
        cx: &mut Context<'_>,
        len: usize,
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_answer(cx));
        self.state = State::Lingering(Box::pin(tokio::time::sleep(LINGER)));
        Poll::Ready(Ok(len))
    }

    /// Writes the refusal and shuts the write side. A client already gone is not an error here.
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let State::Answering { response, written } = &mut self.state else {
            return Poll::Ready(());
        };
        while *written < response.len() {
            match ready!(Pin::new(&mut self.io).poll_write(cx, &response[*written..])) {
                Ok(n) if n > 0 => *written += n,
                _ => *written = response.len(),
            }
        }
        let _ = ready!(Pin::new(&mut self.io).poll_flush(cx));
        let _ = ready!(Pin::new(&mut self.io).poll_shutdown(cx));
        Poll::Ready(())
    }
}

/// What hyper gets once the connection is no longer its own.
fn refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "connection closed by the HTTP/1 framing check",
    )
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for FramingGuard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Open => {
                    if ready!(this.read_open(cx, buf))? {
                        return Poll::Ready(Ok(()));
                    }
                }
                State::Doomed | State::Closed => return Poll::Ready(Err(refused())),
                State::Refusing { .. } => ready!(this.poll_turn(cx)),
                State::Answering { .. } => {
                    ready!(this.poll_answer(cx));
                    this.state = State::Lingering(Box::pin(tokio::time::sleep(LINGER)));
                }
                State::Lingering(deadline) => {
                    ready!(drain(&mut this.io, deadline, cx));
                    this.state = State::Closed;
                }
            }
        }
    }
}

/// Reads and discards until the client closes (or fails) or `deadline` passes.
fn drain<IO: AsyncRead + Unpin>(
    io: &mut IO,
    deadline: &mut Pin<Box<Sleep>>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let mut scratch = [0u8; 4096];
    loop {
        // Checked first: a client that keeps the socket readable would otherwise be read
        // until tokio's task budget runs out, and then the timer too answers pending.
        if deadline.is_elapsed() {
            return Poll::Ready(());
        }
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut *io).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) if !buf.filled().is_empty() => continue,
            Poll::Ready(_) => return Poll::Ready(()),
            Poll::Pending => return deadline.as_mut().poll(cx),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for FramingGuard<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.substitute(data);
        if let State::Answering { .. } = this.state {
            return this.poll_answer_for_hyper(cx, data.len());
        }
        if this.taken_over() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, data))?;
        this.wrote(&data[..n]);
        this.start_head_timer(cx);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.substitute(first);
        }
        if let State::Answering { .. } = this.state {
            let len = bufs.iter().map(|b| b.len()).sum();
            return this.poll_answer_for_hyper(cx, len);
        }
        if this.taken_over() {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        let mut left = n;
        for buf in bufs {
            let take = left.min(buf.len());
            this.wrote(&buf[..take]);
            left -= take;
            if left == 0 {
                break;
            }
        }
        this.start_head_timer(cx);
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.taken_over() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    /// hyper closing while a refusal still waits (the earlier request said `Connection:
    /// close`): the refused request gets no answer, as none would be read after that one.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match this.state {
                State::Open | State::Doomed | State::Refusing { .. } => {
                    return Pin::new(&mut this.io).poll_shutdown(cx)
                }
                State::Answering { .. } => {
                    ready!(this.poll_answer(cx));
                    this.state = State::Lingering(Box::pin(tokio::time::sleep(LINGER)));
                }
                // After an answer (in hyper's place, or the guard's own when the connection is
                // shut while it is written): what the client still sends is read and dropped,
                // so closing does not reset the connection under the answer.
                State::Lingering(ref mut deadline) => {
                    ready!(drain(&mut this.io, deadline, cx));
                    this.state = State::Closed;
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

/// The refusal, as HTTP/1.1 bytes: permgate's error rendering plus the headers hyper would add.
fn refusal_response(refusal: Refusal, id: &HeaderValue) -> Vec<u8> {
    let error = refusal.error();
    let body = error.body();
    let response = error.into_response();
    let status = response.status();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or_default()
    );
    for (name, value) in response.headers() {
        let _ = write!(head, "{name}: {}\r\n", value.to_str().unwrap_or_default());
    }
    let _ = write!(
        head,
        "content-length: {}\r\nconnection: close\r\nx-request-id: {}\r\ndate: {}\r\n\r\n",
        body.len(),
        id.to_str().unwrap_or_default(),
        httpdate::fmt_http_date(SystemTime::now()),
    );
    let mut out = head.into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Why a head is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    LengthAndEncoding,
    NotExactlyChunked,
    EncodingOnHttp10,
    /// A `Content-Length` that is not one decimal number, or two that disagree.
    BadLength,
    /// Still incomplete at hyper's buffer size; or more than 100 fields (hyper's 431).
    HeadTooLarge,
    /// A request-target over hyper's limit (hyper's 414).
    UriTooLong,
    /// A head hyper's parser refused (hyper's 400).
    Malformed,
}

impl Refusal {
    fn error(self) -> Error {
        let transfer_encoding =
            |message: &'static str| Error::invalid("transfer-encoding", message);
        match self {
            Refusal::LengthAndEncoding => transfer_encoding(
                "A request may not carry both Content-Length and Transfer-Encoding: its length would be ambiguous.",
            ),
            Refusal::NotExactlyChunked => transfer_encoding(
                "Transfer-Encoding must be exactly 'chunked', on one header line: other codings and lists are not accepted.",
            ),
            Refusal::EncodingOnHttp10 => {
                transfer_encoding("Transfer-Encoding is not defined for HTTP/1.0 requests.")
            }
            Refusal::BadLength => Error::invalid(
                "content-length",
                "Content-Length must be one decimal number below 2^64 - 2 (repeated lines must agree).",
            ),
            Refusal::HeadTooLarge => Error::HeadersTooLarge,
            Refusal::UriTooLong => Error::UriTooLong,
            Refusal::Malformed => Error::MalformedRequest,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Refusal::LengthAndEncoding => "content-length with transfer-encoding",
            Refusal::NotExactlyChunked => "transfer-encoding not exactly chunked",
            Refusal::EncodingOnHttp10 => "transfer-encoding on HTTP/1.0",
            Refusal::BadLength => "content-length not one decimal number",
            Refusal::HeadTooLarge => "head over server.max_header_bytes or over 100 fields",
            Refusal::UriTooLong => "request-target over hyper's limit",
            Refusal::Malformed => "head hyper could not parse",
        }
    }

    /// The `reason` label of `permgate_framing_refusals_total` (one of
    /// [`metrics::FRAMING_REFUSALS`](crate::metrics::FRAMING_REFUSALS)).
    fn label(self) -> &'static str {
        match self {
            Refusal::LengthAndEncoding => "length_and_encoding",
            Refusal::NotExactlyChunked => "not_exactly_chunked",
            Refusal::EncodingOnHttp10 => "encoding_on_http10",
            Refusal::BadLength => "bad_content_length",
            Refusal::HeadTooLarge | Refusal::UriTooLong => "head_too_large",
            Refusal::Malformed => "malformed",
        }
    }
}

/// What a read may hand to hyper: `deliver` counts bytes from the start of the read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    /// Hand over `deliver` bytes, then refuse the head that starts there.
    Refuse {
        deliver: usize,
        refusal: Refusal,
    },
    /// Hand over `deliver` bytes (hyper refuses the head in them itself), then nothing more.
    Doom {
        deliver: usize,
    },
}

/// One stretch of a read: the scanner's answer for the bytes from its current position.
enum Step {
    Advance(usize),
    /// The rest of the read passes.
    Pass,
    Refuse(Refusal),
    Doom(usize),
}

/// The connection's framing state, without I/O: reads in, writes out.
#[derive(Debug)]
struct Scanner {
    max_head: usize,
    config: httparse::ParserConfig,
    read: ReadPhase,
    request_head: HeadBuf,
    /// Requests handed to hyper whose answer has not started, oldest first.
    requests: VecDeque<Method>,
    write: WritePhase,
    response_head: HeadBuf,
    /// An answer's head is written and its body is not finished.
    answering: bool,
    /// Request heads completed so far.
    heads: u64,
    /// The caller's `x-request-id` of the head just refused, if it sent one.
    refused_request_id: Option<HeaderValue>,
    /// The caller's `x-request-id` of a head handed to hyper that hyper will refuse (more
    /// fields than it takes), and that head's number, for the answer written in place of
    /// hyper's to that head.
    unparsed_request_id: Option<(u64, HeaderValue)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadPhase {
    /// Matching the HTTP/2 preface; that many bytes matched so far.
    Preface(usize),
    Head,
    Length(u64),
    Chunked(Chunked),
    /// HTTP/2: nothing to check.
    Tunnel,
    /// A verdict was given; the guard reads no further.
    Stopped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WritePhase {
    Head,
    Length(u64),
    Chunked(Chunked),
    /// Answers that cannot be followed (HTTP/2, an upgrade, a body until close).
    Untracked,
}

/// What a response's framing depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Head,
    Connect,
    Other,
}

impl Scanner {
    fn new(max_head: usize) -> Scanner {
        let mut config = httparse::ParserConfig::default();
        // At least as lenient as hyper can be configured, so that any head hyper completes,
        // the scanner completes too (skipped invalid lines make hyper refuse, or skip them too).
        config
            .allow_multiple_spaces_in_request_line_delimiters(true)
            .ignore_invalid_headers_in_requests(true)
            .allow_space_before_first_header_name(true);
        Scanner {
            max_head,
            config,
            read: ReadPhase::Preface(0),
            request_head: HeadBuf::default(),
            requests: VecDeque::new(),
            write: WritePhase::Head,
            response_head: HeadBuf::default(),
            answering: false,
            heads: 0,
            refused_request_id: None,
            unparsed_request_id: None,
        }
    }

    /// Scans the bytes of one read.
    fn on_read(&mut self, data: &[u8]) -> Verdict {
        let mut at = 0;
        while at < data.len() {
            let rest = &data[at..];
            let step = match self.read {
                ReadPhase::Preface(matched) => self.preface(matched, rest),
                ReadPhase::Head => self.head(rest),
                ReadPhase::Length(left) => {
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    self.read = match left - take as u64 {
                        0 => ReadPhase::Head,
                        left => ReadPhase::Length(left),
                    };
                    Step::Advance(take)
                }
                ReadPhase::Chunked(mut chunked) => match chunked.follow(rest) {
                    Ok(used) => {
                        self.read = match chunked {
                            Chunked::Done => ReadPhase::Head,
                            _ => ReadPhase::Chunked(chunked),
                        };
                        Step::Advance(used)
                    }
                    // hyper's decoder fails on the same byte: it gets it, and nothing after.
                    Err(bad) => {
                        self.read = ReadPhase::Stopped;
                        Step::Doom(bad + 1)
                    }
                },
                ReadPhase::Tunnel | ReadPhase::Stopped => Step::Pass,
            };
            match step {
                Step::Advance(n) => at += n,
                Step::Pass => break,
                Step::Refuse(refusal) => {
                    return Verdict::Refuse {
                        deliver: at,
                        refusal,
                    }
                }
                Step::Doom(n) => return Verdict::Doom { deliver: at + n },
            }
        }
        Verdict::Pass
    }

    /// Mirrors hyper-util's version detection: the full preface is HTTP/2, anything else (from
    /// the first byte that differs) HTTP/1, whose first head began with the matched bytes.
    fn preface(&mut self, matched: usize, rest: &[u8]) -> Step {
        let expected = &H2_PREFACE[matched..];
        let same = expected
            .iter()
            .zip(rest)
            .take_while(|(a, b)| a == b)
            .count();
        if same == expected.len() {
            self.read = ReadPhase::Tunnel;
            self.write = WritePhase::Untracked;
            return Step::Pass;
        }
        if same == rest.len() {
            self.read = ReadPhase::Preface(matched + same);
            return Step::Pass;
        }
        self.request_head
            .bytes
            .extend_from_slice(&H2_PREFACE[..matched]);
        self.read = ReadPhase::Head;
        Step::Advance(0)
    }

    fn head(&mut self, rest: &[u8]) -> Step {
        let config = &self.config;
        match self
            .request_head
            .assemble(rest, |b| parse_request(config, b))
        {
            Assembled::Complete { head, used } => self.start_body(head, used),
            Assembled::Partial if self.request_head.len() < self.max_head => Step::Pass,
            // Too long: with these bytes hyper's buffer would be full, so they are withheld
            // (what hyper holds of the head is less than its limit).
            Assembled::Partial => {
                self.read = ReadPhase::Stopped;
                Step::Refuse(Refusal::HeadTooLarge)
            }
            // hyper's parser, no more lenient than this one, refuses these bytes; its answer is
            // replaced as it is written (`hyper_refusal`).
            Assembled::Malformed => {
                self.read = ReadPhase::Stopped;
                Step::Doom(rest.len())
            }
        }
    }

    fn start_body(&mut self, head: RequestHead, used: usize) -> Step {
        self.heads += 1;
        self.read = match head.framing {
            Framing::Refuse(refusal) => {
                self.read = ReadPhase::Stopped;
                self.refused_request_id = head.request_id;
                return Step::Refuse(refusal);
            }
            Framing::Empty | Framing::Length(0) => ReadPhase::Head,
            Framing::Length(n) => ReadPhase::Length(n),
            Framing::Chunked => ReadPhase::Chunked(Chunked::Start),
        };
        if let Some(id) = head.request_id {
            self.unparsed_request_id = Some((self.heads, id));
        }
        self.expect_answer(head.method);
        Step::Advance(used)
    }

    /// hyper's own answer to a head it could not parse, if `data` starts one: at the start of
    /// an answer, a 400, 414 or 431 with no body, no `content-type` and no `x-request-id`, which
    /// is all hyper writes for it. Every answer permgate's services make has a request id or a
    /// typed body. Other answers cost a comparison of their status here.
    fn hyper_refusal(&self, data: &[u8]) -> Option<Refusal> {
        // What hyper's answer to a head it could not parse stands for, by its status.
        let refusal = match data.get(STATUS_LINE_START - 3..STATUS_LINE_START)? {
            b"400" => Refusal::Malformed,
            b"414" => Refusal::UriTooLong,
            b"431" => Refusal::HeadTooLarge,
            _ => return None,
        };
        if self.write != WritePhase::Head || self.response_head.len() > 0 {
            return None;
        }
        let Ok(Some((len, head))) = parse_response(data) else {
            return None;
        };
        let lines = &data[..len];
        let names = [&b"\ncontent-type:"[..], b"\nx-request-id:"];
        if names
            .iter()
            .any(|name| memchr::memmem::find(lines, name).is_some())
        {
            return None;
        }
        matches!(head.body, ResponseBody::Length(0) | ResponseBody::Unknown).then_some(refusal)
    }

    /// The request id kept for the head whose answer starts next, if one was kept for it: the
    /// oldest head handed to hyper and not answered yet.
    fn unparsed_id_of_next_answer(&mut self) -> Option<HeaderValue> {
        let unanswered = u64::try_from(self.requests.len()).ok()?;
        let next = self.heads.checked_sub(unanswered)? + 1;
        let (head, _) = self.unparsed_request_id.as_ref()?;
        (*head == next && unanswered > 0)
            .then(|| self.unparsed_request_id.take().map(|(_, id)| id))
            .flatten()
    }

    fn expect_answer(&mut self, method: Method) {
        if self.write != WritePhase::Untracked {
            self.requests.push_back(method);
        }
    }

    /// The number of the head the connection waits for (heads completed before it), while it
    /// waits for one: between requests once every answer is written, or with part of a head
    /// read. `None` while a request is being read or answered (or once the answers cannot be
    /// followed), and on HTTP/2.
    fn awaited_head(&self) -> Option<u64> {
        let between = matches!(self.read, ReadPhase::Preface(_) | ReadPhase::Head);
        // Answers that cannot be followed may still be under way: no deadline then.
        let answered = self.unanswered() == Some(0);
        (between && answered).then_some(self.heads)
    }

    /// Requests handed to hyper and not yet fully answered; `None` once the answers cannot be
    /// followed.
    fn unanswered(&self) -> Option<usize> {
        match self.write {
            WritePhase::Untracked => None,
            _ => Some(self.requests.len() + usize::from(self.answering)),
        }
    }

    /// Follows the answers hyper writes (trusted: hyper frames them).
    fn on_write(&mut self, data: &[u8]) {
        let mut at = 0;
        while at < data.len() {
            let rest = &data[at..];
            at += match self.write {
                WritePhase::Head => match self.response_head.assemble(rest, parse_response) {
                    Assembled::Complete { head, used } => {
                        self.start_answer(head);
                        used
                    }
                    Assembled::Partial => return,
                    Assembled::Malformed => {
                        self.untrack();
                        return;
                    }
                },
                WritePhase::Length(left) => {
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    match left - take as u64 {
                        0 => self.end_answer(),
                        left => self.write = WritePhase::Length(left),
                    }
                    take
                }
                WritePhase::Chunked(mut chunked) => match chunked.follow(rest) {
                    Ok(used) if chunked == Chunked::Done => {
                        self.end_answer();
                        used
                    }
                    Ok(used) => {
                        self.write = WritePhase::Chunked(chunked);
                        used
                    }
                    Err(_) => {
                        self.untrack();
                        return;
                    }
                },
                WritePhase::Untracked => return,
            };
        }
    }

    fn start_answer(&mut self, head: ResponseHead) {
        let status = head.status;
        if (100..200).contains(&status) && status != 101 {
            return; // Interim (100 Continue): the final answer follows.
        }
        let method = self.requests.pop_front().unwrap_or(Method::Other);
        let body = if status == 101 || (method == Method::Connect && (200..300).contains(&status)) {
            ResponseBody::Unknown
        } else if method == Method::Head || status == 204 || status == 304 {
            ResponseBody::Length(0)
        } else {
            head.body
        };
        match body {
            ResponseBody::Length(0) => {}
            ResponseBody::Length(n) => {
                self.write = WritePhase::Length(n);
                self.answering = true;
            }
            ResponseBody::Chunked => {
                self.write = WritePhase::Chunked(Chunked::Start);
                self.answering = true;
            }
            ResponseBody::Unknown => self.untrack(),
        }
    }

    fn end_answer(&mut self) {
        self.write = WritePhase::Head;
        self.answering = false;
    }

    fn untrack(&mut self) {
        self.write = WritePhase::Untracked;
        self.requests.clear();
        self.answering = false;
    }
}

/// The body a request head announces, or why it is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Refuse(Refusal),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestHead {
    method: Method,
    framing: Framing,
    /// The caller's `x-request-id`, kept for a refused head's answer only.
    request_id: Option<HeaderValue>,
}

/// RFC 9112 6.3 as the SPEC narrows it. Repeated identical `Content-Length` values are one
/// length (RFC 9110 8.6; hyper agrees).
fn request_framing(version: Option<u8>, headers: &[httparse::Header<'_>]) -> Framing {
    let mut encodings = 0usize;
    let mut chunked = false;
    let mut length: Option<Option<u64>> = None;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            encodings += 1;
            chunked = header.value.eq_ignore_ascii_case(b"chunked");
        } else if header.name.eq_ignore_ascii_case("content-length") {
            let value = decimal(header.value).filter(|n| *n <= MAX_LENGTH);
            length = Some(match length {
                Some(previous) if previous != value => None,
                _ => value,
            });
        }
    }
    match (encodings, length) {
        (0, None) => Framing::Empty,
        (0, Some(Some(n))) => Framing::Length(n),
        (0, Some(None)) => Framing::Refuse(Refusal::BadLength),
        (_, Some(_)) => Framing::Refuse(Refusal::LengthAndEncoding),
        (1, None) if chunked && version != Some(0) => Framing::Chunked,
        (1, None) if chunked => Framing::Refuse(Refusal::EncodingOnHttp10),
        _ => Framing::Refuse(Refusal::NotExactlyChunked),
    }
}

/// 1*DIGIT, as hyper reads a `Content-Length` (no sign, no list, no whitespace inside).
fn decimal(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, b| match b {
        b'0'..=b'9' => n.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}

/// A complete head and its length, `None` while incomplete.
type Parsed<T> = Result<Option<(usize, T)>, httparse::Error>;

#[cfg(test)]
thread_local! {
    /// Request heads parsed on this thread, so tests can bound the work a stream costs.
    static PARSES: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn parse_request(config: &httparse::ParserConfig, bytes: &[u8]) -> Parsed<RequestHead> {
    #[cfg(test)]
    PARSES.with(|n| n.set(n.get() + 1));
    let mut headers = [MaybeUninit::uninit(); MAX_HEADERS];
    match request_head(config, bytes, &mut headers, false) {
        // More fields than hyper takes: read them all (a hidden Transfer-Encoding must not
        // pass because the scanner stopped counting); hyper refuses the head (431), and the
        // answer in its place keeps the caller's request id.
        Err(httparse::Error::TooManyHeaders) => {
            let lines = bytes.iter().filter(|b| **b == b'\n').count();
            let mut headers = vec![MaybeUninit::uninit(); lines];
            request_head(config, bytes, &mut headers, true)
        }
        parsed => parsed,
    }
}

/// `refused`: the head will be refused whatever its framing, so its request id is kept.
fn request_head<'b>(
    config: &httparse::ParserConfig,
    bytes: &'b [u8],
    headers: &mut [MaybeUninit<httparse::Header<'b>>],
    refused: bool,
) -> Parsed<RequestHead> {
    let mut request = httparse::Request::new(&mut []);
    let httparse::Status::Complete(len) =
        config.parse_request_with_uninit_headers(&mut request, bytes, headers)?
    else {
        return Ok(None);
    };
    let method = match request.method {
        Some("HEAD") => Method::Head,
        Some("CONNECT") => Method::Connect,
        _ => Method::Other,
    };
    let framing = request_framing(request.version, request.headers);
    let request_id = match framing {
        Framing::Refuse(_) => true,
        _ => refused,
    }
    .then(|| {
        let field = request.headers.iter();
        let mut ids = field.filter(|h| h.name.eq_ignore_ascii_case("x-request-id"));
        HeaderValue::from_bytes(ids.next()?.value).ok()
    })
    .flatten();
    Ok(Some((
        len,
        RequestHead {
            method,
            framing,
            request_id,
        },
    )))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseBody {
    Length(u64),
    Chunked,
    /// Until the connection closes, or not HTTP any more.
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ResponseHead {
    status: u16,
    /// As the headers say; the request method and status may override it.
    body: ResponseBody,
}

/// `HTTP/1.1 200`: what an answer's head starts with.
const STATUS_LINE_START: usize = 12;

/// An answer's head, read the way hyper writes one: `HTTP/1.x NNN reason`, then `name: value`
/// lines with lower-case names, each ending in CRLF, then an empty line. hyper wrote it, so
/// it is trusted, and this runs once per answer, so it looks only for the status and the two
/// fields that frame the body instead of parsing every line. Anything else is an error: the
/// answers are then no longer followed.
fn parse_response(bytes: &[u8]) -> Parsed<ResponseHead> {
    if bytes.len() < STATUS_LINE_START {
        return Ok(None);
    }
    let status = match bytes {
        [b'H', b'T', b'T', b'P', b'/', b'1', b'.', b'0' | b'1', b' ', a, b, c, ..]
            if [a, b, c].iter().all(|d| d.is_ascii_digit()) =>
        {
            [a, b, c]
                .iter()
                .fold(0, |n, d| n * 10 + u16::from(*d - b'0'))
        }
        _ => return Err(httparse::Error::Status),
    };
    let mut body = ResponseBody::Unknown;
    let mut framed = false;
    // One pass over the line ends: a line that is empty ends the head; until a
    // `transfer-encoding` line, the last `content-length` line frames the body.
    for lf in memchr::memchr_iter(b'\n', bytes) {
        let line = &bytes[lf + 1..];
        if line.starts_with(b"\r\n") {
            return Ok(Some((lf + 3, ResponseHead { status, body })));
        }
        if framed {
            continue;
        }
        if let Some(value) = line.strip_prefix(b"transfer-encoding:") {
            body = match field_value(value) {
                b"chunked" => ResponseBody::Chunked,
                _ => ResponseBody::Unknown,
            };
            framed = true;
        } else if let Some(value) = line.strip_prefix(b"content-length:") {
            body = decimal(field_value(value)).map_or(ResponseBody::Unknown, ResponseBody::Length);
        }
    }
    Ok(None)
}

/// A field's value: up to the line's CR, without the spaces around it.
fn field_value(rest: &[u8]) -> &[u8] {
    let end = memchr::memchr(b'\r', rest).unwrap_or(rest.len());
    rest[..end].trim_ascii()
}

/// The start of a head that straddles reads (or writes); empty between heads.
#[derive(Debug, Default)]
struct HeadBuf {
    bytes: Vec<u8>,
    /// Empty lines before the head (RFC 9112 §2.2), passed on but not kept: they count
    /// towards the head's size, as they fill hyper's buffer, but are never parsed again.
    skipped: usize,
}

enum Assembled<T> {
    /// `used`: the head's bytes in this call's data.
    Complete {
        head: T,
        used: usize,
    },
    /// All of the data belongs to an incomplete head.
    Partial,
    Malformed,
}

impl HeadBuf {
    /// The incomplete head's size so far, empty lines before it included.
    fn len(&self) -> usize {
        self.skipped + self.bytes.len()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.skipped = 0;
    }

    /// Continues the head with `data`, parsing at most once. Empty lines before the head are
    /// skipped, as httparse and hyper skip them. With nothing buffered (the common case), the
    /// head is parsed where it lies; otherwise it is copied and parsed up to the last possible
    /// end (an empty line) in `data`, if any, so the work per read is linear in the head,
    /// however it arrives.
    fn assemble<T>(&mut self, data: &[u8], parse: impl Fn(&[u8]) -> Parsed<T>) -> Assembled<T> {
        let skip = self.skip_empty_lines(data);
        let data = &data[skip..];
        if data.is_empty() {
            return Assembled::Partial;
        }
        if self.bytes.is_empty() {
            return match parse(data) {
                Ok(Some((used, head))) => {
                    self.clear();
                    Assembled::Complete {
                        head,
                        used: skip + used,
                    }
                }
                Ok(None) => {
                    self.bytes.extend_from_slice(data);
                    Assembled::Partial
                }
                Err(_) => Assembled::Malformed,
            };
        }
        // Something is buffered, so nothing was skipped in this call.
        let before = self.bytes.len();
        self.bytes.extend_from_slice(data);
        let Some(end) = last_head_end(&self.bytes, before) else {
            return Assembled::Partial;
        };
        match parse(&self.bytes[..end]) {
            Ok(Some((len, head))) => {
                self.clear();
                match len.checked_sub(before) {
                    Some(used) if used > 0 => Assembled::Complete { head, used },
                    _ => Assembled::Malformed, // Cannot happen: the buffer was incomplete.
                }
            }
            Ok(None) => Assembled::Partial,
            Err(_) => Assembled::Malformed,
        }
    }

    /// Takes the empty lines (`\n` or `\r\n`) at the start of `data` while no head has begun,
    /// and returns how many bytes they are. A CR that ends a read is buffered; an LF starting
    /// the next read completes it as one more empty line.
    fn skip_empty_lines(&mut self, data: &[u8]) -> usize {
        let mut at = 0;
        if self.bytes == [b'\r'] && data.first() == Some(&b'\n') {
            self.bytes.clear();
            self.skipped += 1;
            at = 1;
        }
        if !self.bytes.is_empty() {
            return 0;
        }
        loop {
            match data[at..] {
                [b'\n', ..] => at += 1,
                [b'\r', b'\n', ..] => at += 2,
                _ => break,
            }
        }
        self.skipped += at;
        at
    }
}

/// The end of the last empty line (`\n\n` or `\n\r\n`, as httparse accepts line ends) in
/// `bytes` that ends after `from`.
fn last_head_end(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len())
        .rev()
        .find(|&i| {
            bytes[i] == b'\n'
                && (i.checked_sub(1).map(|j| bytes[j]) == Some(b'\n')
                    || (i.checked_sub(1).map(|j| bytes[j]) == Some(b'\r')
                        && i.checked_sub(2).map(|j| bytes[j]) == Some(b'\n')))
        })
        .map(|i| i + 1)
}

/// hyper's chunked decoder (`proto/h1/decode.rs`), byte for byte: hex size, optional spaces or
/// tabs, an extension up to CR (a bare LF in it is an error), CRLF, data, CRLF; after the
/// last (zero) chunk, trailer lines each ending in CRLF, then CRLF.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    Start,
    Size(u64),
    SizeLws(u64),
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl Chunked {
    /// Follows `data`: how many of its bytes belong to the body (all, unless it ends in them),
    /// or the index of the first byte hyper's decoder would fail on.
    fn follow(&mut self, data: &[u8]) -> Result<usize, usize> {
        let mut at = 0;
        while at < data.len() && *self != Chunked::Done {
            if let Chunked::Data(left) = *self {
                let take = (data.len() - at).min(usize::try_from(left).unwrap_or(usize::MAX));
                *self = match left - take as u64 {
                    0 => Chunked::DataCr,
                    left => Chunked::Data(left),
                };
                at += take;
                continue;
            }
            *self = self.next(data[at]).ok_or(at)?;
            at += 1;
        }
        Ok(at)
    }

    fn next(self, byte: u8) -> Option<Chunked> {
        use Chunked::*;
        Some(match (self, byte) {
            (Start, b) => Size(hex(b)?),
            (Size(n), b'\t' | b' ') | (SizeLws(n), b'\t' | b' ') => SizeLws(n),
            (Size(n) | SizeLws(n), b';') => Extension(n),
            (Size(n) | SizeLws(n) | Extension(n), b'\r') => SizeLf(n),
            (Size(n), b) => Size(n.checked_mul(16)?.checked_add(hex(b)?)?),
            (Extension(_), b'\n') => return None,
            (Extension(n), _) => Extension(n),
            (SizeLf(0), b'\n') => EndCr,
            (SizeLf(n), b'\n') => Data(n),
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Start,
            (EndCr, b'\r') => EndLf,
            (EndCr, _) => Trailer,
            (Trailer, b'\r') => TrailerLf,
            (Trailer, _) => Trailer,
            (TrailerLf, b'\n') => EndCr,
            (EndLf, b'\n') => Done,
            _ => return None,
        })
    }
}

fn hex(byte: u8) -> Option<u64> {
    char::from(byte).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 32 * 1024;

    fn scanner() -> Scanner {
        Scanner::new(LIMIT)
    }

    /// Feeds `data` in pieces of `size` bytes; every verdict before the last piece must pass.
    fn feed(scanner: &mut Scanner, data: &[u8], size: usize) -> Verdict {
        let pieces: Vec<&[u8]> = data.chunks(size).collect();
        for (i, piece) in pieces.iter().enumerate() {
            let verdict = scanner.on_read(piece);
            if verdict != Verdict::Pass {
                let offset = i * size;
                return match verdict {
                    Verdict::Refuse { deliver, refusal } => Verdict::Refuse {
                        deliver: offset + deliver,
                        refusal,
                    },
                    Verdict::Doom { deliver } => Verdict::Doom {
                        deliver: offset + deliver,
                    },
                    Verdict::Pass => unreachable!(),
                };
            }
        }
        Verdict::Pass
    }

    /// In every piece size from byte-by-byte to all at once.
    fn every_split(data: &[u8], check: impl Fn(Verdict, &Scanner, usize)) {
        for size in 1..=data.len() {
            let mut s = scanner();
            let verdict = feed(&mut s, data, size);
            check(verdict, &s, size);
        }
    }

    fn framing(head: &str) -> Framing {
        match parse_request(&scanner().config, head.as_bytes()) {
            Ok(Some((len, head_parsed))) => {
                assert_eq!(len, head.len());
                head_parsed.framing
            }
            other => panic!("{head:?}: {other:?}"),
        }
    }

    #[test]
    fn every_refusal_is_counted_under_a_reason_exposed_from_the_start() {
        for refusal in [
            Refusal::LengthAndEncoding,
            Refusal::NotExactlyChunked,
            Refusal::EncodingOnHttp10,
            Refusal::BadLength,
            Refusal::HeadTooLarge,
            Refusal::UriTooLong,
            Refusal::Malformed,
        ] {
            assert!(crate::metrics::FRAMING_REFUSALS.contains(&refusal.label()));
        }
    }

    #[test]
    fn framing_follows_the_spec() {
        let post = |headers: &str| format!("POST / HTTP/1.1\r\nHost: x\r\n{headers}\r\n");
        let refuse_both = Framing::Refuse(Refusal::LengthAndEncoding);
        let refuse_te = Framing::Refuse(Refusal::NotExactlyChunked);
        let bad_length = Framing::Refuse(Refusal::BadLength);
        let cases = [
            ("", Framing::Empty),
            ("Content-Length: 12\r\n", Framing::Length(12)),
            ("content-length: 007\r\n", Framing::Length(7)),
            (
                "Content-Length: 2\r\nContent-Length: 2\r\n",
                Framing::Length(2),
            ),
            ("Content-Length: 2\r\nContent-Length: 3\r\n", bad_length),
            ("Content-Length: 2, 2\r\n", bad_length),
            ("Content-Length: +2\r\n", bad_length),
            ("Content-Length: \r\n", Framing::Refuse(Refusal::BadLength)),
            ("Content-Length: 18446744073709551614\r\n", bad_length),
            ("Content-Length: 99999999999999999999999\r\n", bad_length),
            ("Transfer-Encoding: chunked\r\n", Framing::Chunked),
            ("transfer-encoding: Chunked\r\n", Framing::Chunked),
            ("TRANSFER-ENCODING:  CHUNKED \t\r\n", Framing::Chunked),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 6\r\n",
                refuse_both,
            ),
            (
                "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n",
                refuse_both,
            ),
            (
                "Content-Length: x\r\nTransfer-Encoding: chunked\r\n",
                refuse_both,
            ),
            (
                "Transfer-Encoding: identity\r\nContent-Length: 6\r\n",
                refuse_both,
            ),
            ("Transfer-Encoding: gzip, chunked\r\n", refuse_te),
            ("Transfer-Encoding: chunked, identity\r\n", refuse_te),
            ("Transfer-Encoding: chunked, chunked\r\n", refuse_te),
            ("Transfer-Encoding: chunked,\r\n", refuse_te),
            ("Transfer-Encoding: chunked;x=1\r\n", refuse_te),
            ("Transfer-Encoding: \"chunked\"\r\n", refuse_te),
            ("Transfer-Encoding: identity\r\n", refuse_te),
            ("Transfer-Encoding: xchunked\r\n", refuse_te),
            ("Transfer-Encoding: \r\n", refuse_te),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                refuse_te,
            ),
            (
                "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
                refuse_te,
            ),
        ];
        for (headers, expected) in cases {
            assert_eq!(framing(&post(headers)), expected, "{headers:?}");
        }
        let http10 = "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(framing(http10), Framing::Refuse(Refusal::EncodingOnHttp10));
        // A bare LF ends a header line (as in hyper), so a TE behind one is a TE.
        let hidden =
            "POST / HTTP/1.1\r\nX-A: a\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n";
        assert_eq!(framing(hidden), refuse_both);
        // More header lines than hyper's default still all count.
        let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
        let late = post(&format!(
            "{many}Transfer-Encoding: chunked\r\nContent-Length: 1\r\n"
        ));
        assert_eq!(framing(&late), refuse_both);
    }

    const PIPELINE: &str = "GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
        POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 29\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n\r\n\
        POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
        5;name=\"va;lue\"\r\nhello\r\nA \t;\r\n0123456789\r\n0\r\nX-Trailer: t\r\nX-More: u\r\n\r\n\
        \r\nGET /d HTTP/1.1\nHost: x\n\n\
        POST /e HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";

    #[test]
    fn pipelined_messages_pass_in_any_split() {
        every_split(PIPELINE.as_bytes(), |verdict, s, size| {
            assert_eq!(verdict, Verdict::Pass, "piece size {size}");
            assert_eq!(s.read, ReadPhase::Head, "piece size {size}");
            assert!(s.request_head.bytes.is_empty(), "piece size {size}");
            let methods: Vec<Method> = s.requests.iter().copied().collect();
            assert_eq!(methods, [Method::Other; 5], "piece size {size}");
        });
    }

    #[test]
    fn a_refused_head_is_withheld_from_where_it_starts_in_any_split() {
        let bad =
            "POST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        let stream = format!("{PIPELINE}{bad}GET /after HTTP/1.1\r\n\r\n");
        every_split(stream.as_bytes(), |verdict, s, size| {
            let Verdict::Refuse { deliver, refusal } = verdict else {
                panic!("piece size {size}: {verdict:?}");
            };
            assert_eq!(refusal, Refusal::LengthAndEncoding);
            // Whole pieces before the one that completes the head were handed over; in that
            // piece, only the bytes before the refused head.
            let end = PIPELINE.len() + bad.find("\r\n\r\n").unwrap() + 4;
            let piece_start = (end - 1) / size * size;
            assert_eq!(
                deliver,
                PIPELINE.len().max(piece_start),
                "piece size {size}"
            );
            assert_eq!(s.requests.len(), 5);
        });
    }

    #[test]
    fn chunked_bodies_follow_hyper_byte_for_byte() {
        let ok = [
            "0\r\n\r\n".to_owned(),
            "00\r\n\r\n".to_owned(),
            "1\r\na\r\n0\r\n\r\n".to_owned(),
            "1 \t \r\na\r\n0\r\n\r\n".to_owned(),
            "1;a=b;c\r\na\r\n0;last\r\n\r\n".to_owned(),
            "1 ;ext\r\na\r\n0\r\n\r\n".to_owned(),
            format!("fF\r\n{}\r\n0\r\n\r\n", "x".repeat(255)),
            "0\r\nA: b\r\nC: d\r\n\r\n".to_owned(),
            // A bare LF inside a trailer line is just one of its bytes.
            "0\r\nA: b\nc\r\n\r\n".to_owned(),
        ];
        let head = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        for body in ok {
            let stream = format!("{head}{body}GET / HTTP/1.1\r\n\r\n");
            every_split(stream.as_bytes(), |verdict, s, size| {
                assert_eq!(verdict, Verdict::Pass, "{body:?} in pieces of {size}");
                assert_eq!(s.requests.len(), 2, "{body:?} in pieces of {size}");
                assert_eq!(s.read, ReadPhase::Head, "{body:?} in pieces of {size}");
            });
            let mut c = Chunked::Start;
            assert_eq!(c.follow(body.as_bytes()), Ok(body.len()), "{body:?}");
            assert_eq!(c, Chunked::Done);
        }
        let mut c = Chunked::Start;
        assert_eq!(c.follow(b"3\r\nabc\r\n0\r\n\r\nGET"), Ok(13));
        assert_eq!(c, Chunked::Done);
        let bad = [
            ("x\r\n", 0),
            ("\r\n", 0),
            ("1\n", 1),
            ("1 2\r\n", 2),
            ("1;a\nb\r\n", 3),
            ("1\r\nab\r\n", 4),
            ("1\r\na\n", 4),
            ("1\r\na\r\r", 5),
            ("0\r\nA: b\r\r", 8),
            ("0\r\n\rx", 4),
            ("11111111111111111\r\n", 16), // 17 hex digits overflow u64.
        ];
        for (body, at) in bad {
            let mut c = Chunked::Start;
            assert_eq!(c.follow(body.as_bytes()), Err(at), "{body:?}");
        }
    }

    #[test]
    fn a_broken_chunked_body_is_handed_over_through_the_bad_byte_and_no_further() {
        let head = "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let stream = format!("{head}zz\r\n{{}}\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n");
        let mut s = scanner();
        assert_eq!(
            s.on_read(stream.as_bytes()),
            Verdict::Doom {
                deliver: head.len() + 1
            }
        );
    }

    #[test]
    fn a_bad_length_is_refused_and_malformed_heads_are_handed_over_alone() {
        let bad_length = "POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n";
        let stream = format!("{PIPELINE}{bad_length}{{}}xGET /smuggled HTTP/1.1\r\n\r\n");
        every_split(stream.as_bytes(), |verdict, s, size| {
            let Verdict::Refuse { deliver, refusal } = verdict else {
                panic!("piece size {size}: {verdict:?}");
            };
            assert_eq!(refusal, Refusal::BadLength);
            let end = PIPELINE.len() + bad_length.len();
            let piece_start = (end - 1) / size * size;
            assert_eq!(deliver, PIPELINE.len().max(piece_start), "{size}");
            assert_eq!(s.read, ReadPhase::Stopped);
        });
        // Malformed (even leniently): the read goes to hyper, which refuses it; nothing more.
        for malformed in [
            "G(ET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n",
        ] {
            let mut s = scanner();
            let n = malformed.len();
            assert_eq!(
                s.on_read(malformed.as_bytes()),
                Verdict::Doom { deliver: n }
            );
        }
    }

    #[test]
    fn a_head_that_would_fill_hypers_buffer_is_withheld_and_refused() {
        let mut s = Scanner::new(100);
        let long = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(50));
        assert_eq!(s.on_read(long.as_bytes()), Verdict::Pass);
        // hyper holds 66 bytes of the head; the read that reaches 100 is not handed over.
        assert_eq!(
            s.on_read(&[b'a'; 40]),
            Verdict::Refuse {
                deliver: 0,
                refusal: Refusal::HeadTooLarge
            }
        );
        assert_eq!(s.read, ReadPhase::Stopped);
        // In any split that leaves it incomplete over the limit, what was handed over stays
        // under it. (A whole head in one read is complete, and hyper parses it as it is.)
        let head = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(200));
        for size in 1..head.len() {
            let mut s = Scanner::new(100);
            let Verdict::Refuse { deliver, refusal } = feed(&mut s, head.as_bytes(), size) else {
                panic!("piece size {size}");
            };
            assert_eq!(refusal, Refusal::HeadTooLarge);
            assert!(deliver < 100, "{size}: {deliver}");
        }
    }

    #[test]
    fn the_http2_preface_passes_and_anything_else_is_http1() {
        let h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        every_split(h2, |verdict, s, size| {
            assert_eq!(verdict, Verdict::Pass, "{size}");
            assert_eq!(s.read, ReadPhase::Tunnel, "{size}");
            assert_eq!(s.unanswered(), None);
        });
        // Starts like the preface, is not: HTTP/1, and the matched bytes belong to the head.
        let h1 = "PRI * HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        every_split(h1.as_bytes(), |verdict, _, size| {
            let Verdict::Refuse { refusal, .. } = verdict else {
                panic!("{size}: {verdict:?}");
            };
            assert_eq!(refusal, Refusal::LengthAndEncoding);
        });
        let mut s = scanner();
        assert_eq!(
            s.on_read(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
            Verdict::Doom { deliver: 24 }
        );
    }

    #[test]
    fn leading_empty_lines_and_bare_lf_heads() {
        let stream = "\r\n\r\nGET / HTTP/1.1\r\n\r\n\nGET / HTTP/1.1\n\n";
        every_split(stream.as_bytes(), |verdict, s, size| {
            assert_eq!(verdict, Verdict::Pass, "{size}");
            assert_eq!(s.requests.len(), 2, "{size}");
            assert!(s.request_head.bytes.is_empty(), "{size}");
        });
    }

    /// Empty lines before a request line are skipped, not buffered and parsed again at every
    /// further empty line: `\r\n` and then a head's worth of `\n` costs a few parses, not one
    /// per byte over a growing buffer (an unauthenticated CPU sink).
    #[test]
    fn a_head_of_empty_lines_is_not_parsed_again_per_line() {
        const MAX: usize = 64 * 1024;
        let mut stream = b"\r\n".to_vec();
        stream.extend_from_slice(&[b'\n'; MAX]);
        let parses = || PARSES.with(|n| n.get());

        // Within hyper's buffer: all passes, in a handful of parses, and a request still follows.
        let mut s = Scanner::new(2 * MAX);
        let start = parses();
        for piece in stream.chunks(8 * 1024) {
            assert_eq!(s.on_read(piece), Verdict::Pass);
        }
        assert!(parses() - start <= 16, "{} parses", parses() - start);
        assert_eq!(s.read, ReadPhase::Head);
        let bad = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut read = b"\r\n\n".to_vec();
        read.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        // The refused head is withheld with the empty line before it, as before.
        let refused_at = read.len();
        read.extend_from_slice(b"\r\n");
        read.extend_from_slice(bad);
        assert_eq!(
            s.on_read(&read),
            Verdict::Refuse {
                deliver: refused_at,
                refusal: Refusal::LengthAndEncoding
            }
        );
        assert_eq!(s.requests.len(), 1);

        // Past hyper's buffer: the empty lines count, as they do for hyper, and the read that
        // would fill its buffer is withheld and refused (431).
        let mut s = Scanner::new(MAX);
        let start = parses();
        let verdict = feed(&mut s, &stream, 8 * 1024);
        assert_eq!(
            verdict,
            Verdict::Refuse {
                deliver: MAX - 8 * 1024,
                refusal: Refusal::HeadTooLarge
            }
        );
        assert!(parses() - start <= 16, "{} parses", parses() - start);

        // A CR ending one read and its LF starting the next are one empty line.
        let mut s = scanner();
        assert_eq!(s.on_read(b"\r\n\r"), Verdict::Pass);
        assert_eq!(s.on_read(b"\n\nGET / HTTP/1.1\r\n\r"), Verdict::Pass);
        assert_eq!(s.on_read(b"\n"), Verdict::Pass);
        assert_eq!(s.requests.len(), 1);
        assert_eq!(s.read, ReadPhase::Head);
        // A CR not followed by LF: hyper refuses the head itself.
        let mut s = scanner();
        assert_eq!(s.on_read(b"\r"), Verdict::Pass);
        assert_eq!(
            s.on_read(b"GET / HTTP/1.1\r\n\r\n"),
            Verdict::Doom { deliver: 18 }
        );
    }

    /// A head that is still incomplete at its possible ends is parsed once per read, at the
    /// last of them, not once per empty line.
    #[test]
    fn a_buffered_head_is_parsed_once_per_read() {
        let calls = std::cell::Cell::new(0);
        let never_done = |_: &[u8]| -> Parsed<()> {
            calls.set(calls.get() + 1);
            Ok(None)
        };
        let mut head = HeadBuf::default();
        assert!(matches!(
            head.assemble(b"x", never_done),
            Assembled::Partial
        ));
        for _ in 0..8 {
            assert!(matches!(
                head.assemble(&[b'\n'; 8 * 1024], never_done),
                Assembled::Partial
            ));
        }
        assert_eq!(calls.get(), 9);
        assert_eq!(head.len(), 1 + 8 * 8 * 1024);
    }

    /// Answers are counted as hyper writes them, in any split.
    #[test]
    fn answers_are_followed_to_their_end() {
        let requests = "GET / HTTP/1.1\r\n\r\nHEAD / HTTP/1.1\r\n\r\n\
            POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n{}\
            GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n";
        let answers = [
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            "HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n",
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n\
             3\r\nabc\r\n0\r\n\r\n",
            "HTTP/1.1 204 No Content\r\n\r\n",
            "HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
        ];
        let all = answers.concat();
        for size in 1..=all.len() {
            let mut s = scanner();
            assert_eq!(s.on_read(requests.as_bytes()), Verdict::Pass);
            assert_eq!(s.unanswered(), Some(5));
            let mut written = 0;
            let mut ends = Vec::new();
            for answer in answers {
                written += answer.len();
                ends.push(written);
            }
            for (i, piece) in all.as_bytes().chunks(size).enumerate() {
                s.on_write(piece);
                let done = (i * size + piece.len()).min(all.len());
                let answered = ends.iter().filter(|end| **end <= done).count();
                assert_eq!(s.unanswered(), Some(5 - answered), "{size} at {done}");
            }
        }
    }

    #[test]
    fn answers_that_cannot_be_followed_stop_the_count() {
        for answer in [
            "HTTP/1.1 200 OK\r\n\r\nuntil close",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
            "not http\r\n\r\n",
        ] {
            let mut s = scanner();
            s.on_read(b"GET / HTTP/1.1\r\n\r\n");
            s.on_write(answer.as_bytes());
            assert_eq!(s.unanswered(), None, "{answer:?}");
        }
        let mut s = scanner();
        s.on_read(b"CONNECT x:1 HTTP/1.1\r\n\r\n");
        s.on_write(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(s.unanswered(), None);
    }

    #[test]
    fn hypers_own_error_answers_are_recognised_and_nothing_else() {
        let s = scanner();
        for (answer, refusal) in [
            (
                "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                Some(Refusal::Malformed),
            ),
            (
                "HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\n\r\n",
                Some(Refusal::HeadTooLarge),
            ),
            (
                "HTTP/1.1 414 URI Too Long\r\ncontent-length: 0\r\n\r\n",
                Some(Refusal::UriTooLong),
            ),
            // permgate's own errors have a body.
            (
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 97\r\n\r\n",
                None,
            ),
            ("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", None),
            ("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", None),
            ("HTTP/1.1 400 Bad Req", None),
            // A request id or a typed body: not hyper's.
            (
                "HTTP/1.1 400 Bad Request\r\nx-request-id: req_1\r\n\r\n",
                None,
            ),
            (
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n\r\n",
                None,
            ),
            // An interim answer first: the write starts with it, not with a refusal.
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n",
                None,
            ),
        ] {
            assert_eq!(s.hyper_refusal(answer.as_bytes()), refusal, "{answer}");
        }
        // Inside another answer (its body), nothing is recognised.
        let mut s = scanner();
        s.on_read(b"GET / HTTP/1.1\r\n\r\n");
        s.on_write(b"HTTP/1.1 200 OK\r\ncontent-length: 60\r\n\r\n");
        let inside = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(s.hyper_refusal(inside), None);
    }

    /// hyper's answer to a head it refused, written through the guard into a socket that takes
    /// a few bytes at a time: the client gets permgate's whole answer instead, then the close,
    /// through plain and vectored writes alike.
    #[tokio::test]
    async fn the_answer_in_hypers_place_is_written_whole_through_a_slow_socket() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let hypers = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        for vectored in [false, true] {
            let (near, mut far) = tokio::io::duplex(16);
            let mut guard = FramingGuard::new(near, LIMIT, Duration::from_secs(10), None);
            let hyper = async {
                if vectored {
                    let bufs = [IoSlice::new(hypers), IoSlice::new(b"")];
                    assert_eq!(guard.write_vectored(&bufs).await.unwrap(), hypers.len());
                } else {
                    guard.write_all(hypers).await.unwrap();
                }
                guard.flush().await.unwrap();
                guard.shutdown().await.unwrap();
            };
            let client = async {
                let mut got = Vec::new();
                far.read_to_end(&mut got).await.unwrap();
                drop(far); // Closed: the guard's lingering ends.
                String::from_utf8(got).unwrap()
            };
            let ((), got) = tokio::join!(hyper, client);
            let (head, body) = got.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
            assert!(
                head.lines().any(|l| l.starts_with("x-request-id: req_")),
                "{head}"
            );
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(v["error"]["code"], "invalid_request", "{vectored}");
        }
    }

    #[test]
    fn the_refusal_is_permgates_json_400_and_closes() {
        let id = HeaderValue::from_static("req_test");
        let bytes = refusal_response(Refusal::LengthAndEncoding, &id);
        let text = String::from_utf8(bytes).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        for line in [
            "content-type: application/json",
            "x-should-retry: false",
            "connection: close",
            "x-request-id: req_test",
            &format!("content-length: {}", body.len()),
        ] {
            assert!(head.lines().any(|l| l == line), "{line} in {head}");
        }
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_parameter");
        assert_eq!(v["error"]["param"], "transfer-encoding");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        // The refusals hyper would make without a body get permgate's errors too.
        for (refusal, status, code, param) in [
            (
                Refusal::BadLength,
                "400 Bad Request",
                "invalid_parameter",
                serde_json::json!("content-length"),
            ),
            (
                Refusal::HeadTooLarge,
                "431 Request Header Fields Too Large",
                "request_too_large",
                serde_json::Value::Null,
            ),
        ] {
            let text = String::from_utf8(refusal_response(refusal, &id)).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(
                head.starts_with(&format!("HTTP/1.1 {status}\r\n")),
                "{head}"
            );
            assert!(
                head.lines().any(|l| l == "x-request-id: req_test"),
                "{head}"
            );
            let v: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(
                (&v["error"]["code"], &v["error"]["param"]),
                (&code.into(), &param)
            );
        }
    }
}
