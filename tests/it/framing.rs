//! SPEC "The front door": ambiguous framing is refused. Raw HTTP/1 bytes on the data listener:
//! a head with both `Content-Length` and `Transfer-Encoding`, or a `Transfer-Encoding` other
//! than exactly `chunked`, gets permgate's 400 and a closed connection, and nothing reaches
//! upstream even with the writer token; everything framed plainly (lengths, chunked with
//! extensions and trailers, pipelined, split into single bytes, HTTP/2) is served as before.
//!
//! No sleeps: each exchange ends in a close the server makes (a refusal, or `Connection:
//! close`); `timeout` only guards against hangs.

use std::net::SocketAddr;
use std::time::Duration;

use hyper::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

const GUARD: Duration = Duration::from_secs(30);
const BODY: &str = r#"{"project_ids": ["proj_framing"]}"#;

/// A served request that answers locally (404) and closes the connection.
const CANARY: &str = "GET /canary HTTP/1.1\r\nHost: permgate.test\r\nConnection: close\r\n\r\n";

fn post_head(framing: &str) -> String {
    format!(
        "POST {} HTTP/1.1\r\nHost: permgate.test\r\nAuthorization: Bearer {WRITER}\r\n\
         Content-Type: application/json\r\n{framing}\r\n",
        list_path(CP)
    )
}

fn chunked(body: &str) -> String {
    format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len())
}

/// A create hyper alone would serve (Transfer-Encoding wins, the body is valid JSON), so
/// without the front door it reaches upstream.
fn ambiguous_post() -> String {
    let body = chunked(BODY);
    let framing = format!(
        "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
        body.len()
    );
    format!("{}{body}", post_head(&framing))
}

fn get(close: bool) -> String {
    let connection = if close { "Connection: close\r\n" } else { "" };
    format!(
        "GET {} HTTP/1.1\r\nHost: permgate.test\r\nAuthorization: Bearer {READER}\r\n\
         Cache-Control: no-cache\r\n{connection}\r\n",
        list_path(CP)
    )
}

impl RawResponse {
    /// permgate's refusal: 400 `invalid_parameter` naming `transfer-encoding`, with a request
    /// id, and the connection closing.
    fn assert_refusal(&self, what: &str) {
        let body = String::from_utf8_lossy(&self.body);
        assert_eq!(self.status, 400, "{what}: {self:?} {body}");
        let v: serde_json::Value = serde_json::from_slice(&self.body).expect("JSON error body");
        assert_eq!(v["error"]["code"], "invalid_parameter", "{what}: {v}");
        assert_eq!(v["error"]["param"], "transfer-encoding", "{what}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{what}: {v}");
        assert!(v["error"]["message"].is_string(), "{what}: {v}");
        assert_eq!(self.header("connection"), Some("close"), "{what}");
        assert_eq!(self.header("x-should-retry"), Some("false"), "{what}");
        let id = self.header("x-request-id").expect("x-request-id");
        assert!(id.starts_with("req_"), "{what}: {id}");
    }
}

/// Writes `bytes` (concurrently with reading: an early answer-and-close must still be seen)
/// and reads until the server closes.
async fn exchange(addr: SocketAddr, bytes: impl Into<Vec<u8>>) -> Vec<RawResponse> {
    let (received, error) = raw_exchange(addr, bytes).await;
    assert_eq!(
        error,
        None,
        "closed cleanly: {:?}",
        String::from_utf8_lossy(&received)
    );
    raw_responses(&received)
}

/// Sends all of `request` before reading (the server must take it all: a refused connection
/// lingers), then reads to the close: the one answer, without a reset.
async fn send_all_then_read(addr: SocketAddr, request: String) -> Vec<RawResponse> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let sent = tokio::time::timeout(GUARD, stream.write_all(request.as_bytes())).await;
    assert!(
        matches!(sent, Ok(Ok(()))),
        "the whole body was taken: {sent:?}"
    );
    let (received, error) = read_to_close(&mut stream).await;
    assert_eq!(error, None, "{:?}", String::from_utf8_lossy(&received));
    let all = raw_responses(&received);
    assert_eq!(all.len(), 1, "{all:?}");
    all
}

/// One exchange that must be refused, with nothing sent upstream.
async fn assert_refused(gw: &Gateway, what: &str, request: String) {
    let all = exchange(gw.addr, request).await;
    assert_eq!(all.len(), 1, "{what}: {all:?}");
    all[0].assert_refusal(what);
    let seen = gw.mock.requests();
    assert!(seen.is_empty(), "{what}: upstream saw {seen:?}");
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_in_either_order() {
    let gw = start().await;
    let body = chunked(BODY);
    for (what, framing) in [
        (
            "CL then TE",
            format!(
                "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                body.len()
            ),
        ),
        (
            "TE then CL",
            format!(
                "Transfer-Encoding: chunked\r\nContent-Length: {}\r\n",
                body.len()
            ),
        ),
        (
            "TE then CL, lower case",
            format!(
                "transfer-encoding: chunked\r\ncontent-length: {}\r\n",
                body.len()
            ),
        ),
        (
            "CL covering a second request",
            format!(
                "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                body.len() + CANARY.len()
            ),
        ),
    ] {
        let request = format!("{}{body}{CANARY}", post_head(&framing));
        assert_refused(&gw, what, request).await;
    }
    // The gateway itself is fine, and the writer can still write.
    let r = gw.client.post(&list_path(CP), WRITER, BODY).await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.mock.count(&Method::POST), 1);
    assert_refusals(&gw, [4, 0, 0, 0, 0, 0]).await;
}

/// `permgate_framing_refusals_total` by reason, in the order of `metrics::FRAMING_REFUSALS`:
/// length and encoding, not exactly chunked, encoding on HTTP/1.0, bad content length, head
/// too large, malformed.
async fn assert_refusals(gw: &Gateway, counts: [u32; 6]) {
    let metrics = gw.state.render_metrics().await;
    for (reason, count) in permgate::metrics::FRAMING_REFUSALS.into_iter().zip(counts) {
        let line = format!("permgate_framing_refusals_total{{reason=\"{reason}\"}} {count}");
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn transfer_encodings_other_than_exactly_chunked_are_refused() {
    let gw = start().await;
    let body = chunked(BODY);
    for (what, framing) in [
        ("gzip, chunked", "Transfer-Encoding: gzip, chunked\r\n"),
        (
            "chunked, identity",
            "Transfer-Encoding: chunked, identity\r\n",
        ),
        (
            "chunked, chunked",
            "Transfer-Encoding: chunked, chunked\r\n",
        ),
        ("identity", "Transfer-Encoding: identity\r\n"),
        ("a parameter", "Transfer-Encoding: chunked;q=1\r\n"),
        ("empty", "Transfer-Encoding: \r\n"),
        (
            "two lines of chunked",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        ),
        (
            "two lines, gzip then chunked",
            "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        ),
    ] {
        let request = format!("{}{body}{CANARY}", post_head(framing));
        assert_refused(&gw, what, request).await;
    }
    let http10 = post_head("Transfer-Encoding: chunked\r\n").replacen("HTTP/1.1", "HTTP/1.0", 1);
    assert_refused(&gw, "chunked on HTTP/1.0", format!("{http10}{body}")).await;
    assert_refusals(&gw, [0, 8, 1, 0, 0, 0]).await;
}

#[tokio::test]
async fn exactly_chunked_and_plain_lengths_are_served() {
    let gw = start().await;
    let with_extras = format!(
        "5;ext=\"a;b\"\r\n{}\r\n{:x} \t;x\r\n{}\r\n0\r\nX-Trailer: t\r\n\r\n",
        &BODY[..5],
        BODY.len() - 5,
        &BODY[5..]
    );
    for (what, framing, body) in [
        (
            "chunked",
            "Transfer-Encoding: chunked\r\n".to_owned(),
            chunked(BODY),
        ),
        (
            "Chunked, spaced",
            "transfer-encoding:  Chunked \r\n".to_owned(),
            chunked(BODY),
        ),
        (
            "extensions and a trailer",
            "Transfer-Encoding: chunked\r\n".to_owned(),
            with_extras.clone(),
        ),
        (
            "Content-Length",
            format!("Content-Length: {}\r\n", BODY.len()),
            BODY.to_owned(),
        ),
    ] {
        let before = gw.mock.count(&Method::POST);
        let all = exchange(gw.addr, format!("{}{body}{CANARY}", post_head(&framing))).await;
        assert_eq!(all.len(), 2, "{what}: {all:?}");
        assert_eq!(all[0].status, 200, "{what}: {all:?}");
        assert_eq!(all[1].status, 404, "{what}: the canary after it");
        assert_eq!(gw.mock.count(&Method::POST), before + 1, "{what}");
    }
}

#[tokio::test]
async fn pipelined_requests_on_one_connection_are_all_served() {
    let gw = start().await;
    let plain = post_head(&format!("Content-Length: {}\r\n", BODY.len()));
    let chunked_post = post_head("Transfer-Encoding: chunked\r\n");
    let pipeline = format!(
        "{}{plain}{BODY}{chunked_post}{}{}",
        get(false),
        chunked(BODY),
        get(true)
    );
    let all = exchange(gw.addr, pipeline).await;
    let statuses: Vec<u16> = all.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 200, 200, 200], "{all:?}");
    assert_eq!(gw.mock.count(&Method::POST), 2);
    assert_eq!(gw.mock.count(&Method::GET), 2);
}

/// Requests inside a body are body: the smuggled GET would reach upstream if it were ever
/// served, and the smuggled ambiguous POST would be refused if the front door lost track of
/// where the body ends.
#[tokio::test]
async fn a_request_inside_a_body_is_only_body() {
    let gw = start().await;
    let smuggled = format!("{}{}", get(false), ambiguous_post());
    for (what, framing, body) in [
        (
            "Content-Length",
            format!("Content-Length: {}\r\n", smuggled.len()),
            smuggled.clone(),
        ),
        (
            "chunked",
            "Transfer-Encoding: chunked\r\n".to_owned(),
            chunked(&smuggled),
        ),
    ] {
        let all = exchange(gw.addr, format!("{}{body}{CANARY}", post_head(&framing))).await;
        let statuses: Vec<u16> = all.iter().map(|r| r.status).collect();
        // The body is not JSON (400 naming `body`); the canary is the next request.
        assert_eq!(statuses, [400, 404], "{what}: {all:?}");
        let seen = gw.mock.requests();
        assert!(seen.is_empty(), "{what}: upstream saw {seen:?}");
    }
}

/// The front door's other refusals, each after the answer to the pipelined request before it:
/// a `Content-Length` that is not one number (400 naming `content-length`), a head too large
/// for hyper's buffer (431), and a head hyper's parser refuses (400 `invalid_request`, written
/// in place of hyper's bodiless answer). Each is permgate's JSON error with a request id (the
/// caller's, when the refused head was whole enough to carry one), closes, and is counted.
#[tokio::test]
async fn other_refused_heads_get_permgates_errors_after_the_answers_before_them() {
    let gw = start().await;
    let lengths = "Content-Length: 2\r\nContent-Length: 3\r\nX-Request-Id: caller-id-7\r\n";
    let big = format!(
        "GET /big HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "b".repeat(100 * 1024)
    );
    let bad_line = "GET /bad HTTP/1.1\r\nX(A): b\r\nX-Request-Id: not-read\r\n\r\n".to_string();
    let fields: String = (0..120).map(|i| format!("X-F{i}: v\r\n")).collect();
    let many = format!("GET /many HTTP/1.1\r\nX-Request-Id: caller-id-8\r\n{fields}\r\n");
    let insane = "Content-Length: 2\r\nContent-Length: 3\r\nX-Request-Id: not/sane\r\n";
    // (what, refused head, status, code, param, request id)
    let cases = [
        (
            "two lengths",
            format!("{}{{}}", post_head(lengths)),
            400,
            "invalid_parameter",
            Some("content-length"),
            Some("caller-id-7"),
        ),
        (
            "two lengths, an id that is not sane",
            format!("{}{{}}", post_head(insane)),
            400,
            "invalid_parameter",
            Some("content-length"),
            None,
        ),
        ("head too large", big, 431, "request_too_large", None, None),
        // Refused by hyper's parser (the guard's finds it malformed too, so it read no id).
        (
            "bad header line",
            bad_line,
            400,
            "invalid_request",
            None,
            None,
        ),
        // Refused by hyper (over 100 fields); the guard read the head whole.
        (
            "120 fields",
            many,
            431,
            "request_too_large",
            None,
            Some("caller-id-8"),
        ),
    ];
    for (what, refused, status, code, param, id) in cases {
        let all = exchange(gw.addr, format!("{}{refused}{CANARY}", get(false))).await;
        assert_eq!(all.len(), 2, "{what}: {all:?}");
        assert_eq!(all[0].status, 200, "{what}: the GET's answer first");
        let r = &all[1];
        assert_eq!(r.status, status, "{what}: {r:?}");
        let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON error body");
        assert_eq!(v["error"]["code"], code, "{what}: {v}");
        assert_eq!(v["error"]["param"].as_str(), param, "{what}: {v}");
        assert_eq!(r.header("connection"), Some("close"), "{what}");
        assert_eq!(r.header("x-should-retry"), Some("false"), "{what}");
        let sent = r.header("x-request-id").expect("x-request-id");
        match id {
            Some(id) => assert_eq!(sent, id, "{what}"),
            None => assert!(sent.starts_with("req_"), "{what}: {sent}"),
        }
    }
    assert_eq!(
        gw.mock.count(&Method::GET),
        5,
        "only the pipelined GETs went upstream"
    );
    assert_eq!(gw.mock.count(&Method::POST), 0);
    assert_refusals(&gw, [0, 0, 0, 2, 2, 1]).await;
}

/// A head only hyper refuses (over 100 fields: the guard reads it whole and passes it),
/// pipelined before one the guard withholds: hyper's answer to the first still becomes
/// permgate's, and the connection ends with it (the withheld one is never answered).
#[tokio::test]
async fn hypers_refusal_before_a_withheld_head_is_answered_by_permgate() {
    let gw = start().await;
    let fields: String = (0..120).map(|i| format!("X-F{i}: v\r\n")).collect();
    let many = format!("GET /many HTTP/1.1\r\n{fields}\r\n");
    let all = exchange(gw.addr, format!("{many}{}", ambiguous_post())).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let r = &all[0];
    assert_eq!(r.status, 431, "{r:?}");
    let v: serde_json::Value = serde_json::from_slice(&r.body).expect("JSON error body");
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");
    assert!(r.header("x-request-id").unwrap().starts_with("req_"));
    assert_eq!(r.header("connection"), Some("close"));
    assert!(gw.mock.requests().is_empty());
}

/// The caller's request id kept for a head of over 100 fields goes only to that head's answer:
/// a head before it that hyper refuses (here for a line the guard's parser skips) gets a new id.
#[tokio::test]
async fn a_kept_request_id_answers_only_its_own_head() {
    let gw = start().await;
    let fields: String = (0..120).map(|i| format!("X-F{i}: v\r\n")).collect();
    let first = "GET /first HTTP/1.1\r\nX-A : b\r\n\r\n";
    let many = format!("GET /many HTTP/1.1\r\nX-Request-Id: caller-id-9\r\n{fields}\r\n");
    let all = exchange(gw.addr, format!("{first}{many}")).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].status, 400, "{all:?}");
    let id = all[0].header("x-request-id").unwrap();
    assert!(id.starts_with("req_"), "{id}");
}

/// The answer written in place of hyper's lingers as the guard's own refusals do: a client
/// still sending the body of a head hyper refused reads the answer, not a reset.
#[tokio::test]
async fn permgates_answer_for_hyper_reaches_a_client_that_is_still_sending() {
    let gw = start().await;
    let body = "p".repeat(4 << 20);
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: permgate.test\r\nX(A): b\r\nContent-Length: {}\r\n\r\n",
        list_path(CP),
        body.len()
    );
    let all = send_all_then_read(gw.addr, format!("{head}{body}")).await;
    assert_eq!(all[0].status, 400, "{all:?}");
    assert!(all[0].header("x-request-id").is_some());
    assert!(gw.mock.requests().is_empty());
}

/// The refusal of a pipelined request comes after the answer to the request before it, even
/// when that answer is slow: the earlier GET is held at the mock while the refused POST waits.
#[tokio::test]
async fn a_refusal_comes_after_the_answers_before_it() {
    let gw = start().await;
    let mut held = gw.mock.hold_next();
    let bytes = format!("{}{}", get(false), ambiguous_post());
    let (mut reader, mut writer) = TcpStream::connect(gw.addr).await.unwrap().into_split();
    writer.write_all(bytes.as_bytes()).await.unwrap();
    tokio::time::timeout(GUARD, held.arrived()).await.unwrap();
    held.release();
    let (received, error) = read_to_close(&mut reader).await;
    assert_eq!(error, None);
    let all = raw_responses(&received);
    assert_eq!(all.len(), 2, "{all:?}");
    assert_eq!(all[0].status, 200, "the GET's answer first: {all:?}");
    assert_eq!(all[0].header("connection"), None, "{all:?}");
    all[1].assert_refusal("after a held GET");
    assert_eq!(gw.mock.count(&Method::GET), 1);
    assert_eq!(gw.mock.count(&Method::POST), 0);
}

#[tokio::test]
async fn a_refusal_on_a_kept_alive_connection_after_a_served_request() {
    let gw = start().await;
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let plain = post_head(&format!("Content-Length: {}\r\n", BODY.len()));
    stream
        .write_all(format!("{plain}{BODY}").as_bytes())
        .await
        .unwrap();
    // Read exactly the one answer: the connection stays open.
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while responses_complete(&received) < 1 {
        let n = tokio::time::timeout(GUARD, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed early: {:?}",
            String::from_utf8_lossy(&received)
        );
        received.extend_from_slice(&buf[..n]);
    }
    assert_eq!(raw_responses(&received)[0].status, 200);
    stream.write_all(ambiguous_post().as_bytes()).await.unwrap();
    let (rest, error) = read_to_close(&mut stream).await;
    assert_eq!(error, None);
    let all = raw_responses(&rest);
    assert_eq!(all.len(), 1, "{all:?}");
    all[0].assert_refusal("second request on the connection");
    assert_eq!(gw.mock.count(&Method::POST), 1);
}

/// How many whole responses `bytes` holds (0 while the first is incomplete).
fn responses_complete(bytes: &[u8]) -> usize {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut response = httparse::Response::new(&mut headers);
    let Ok(httparse::Status::Complete(len)) = response.parse(bytes) else {
        return 0;
    };
    let cl = response
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"));
    let cl: usize = std::str::from_utf8(cl.unwrap().value)
        .unwrap()
        .parse()
        .unwrap();
    usize::from(bytes.len() >= len + cl)
}

/// After a request with `Connection: close` nothing more is read as a request, so a refused
/// head pipelined behind it gets no answer of its own: one response, then the close.
#[tokio::test]
async fn nothing_is_answered_after_connection_close() {
    let gw = start().await;
    let all = exchange(gw.addr, format!("{}{}", get(true), ambiguous_post())).await;
    let statuses: Vec<u16> = all.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200], "{all:?}");
    assert_eq!(gw.mock.count(&Method::GET), 1);
    assert_eq!(gw.mock.count(&Method::POST), 0);
}

/// A client that keeps sending after its refused head (a large body), and reads only once it
/// is done, still reads the whole 400 and a clean close: the front door reads and discards for
/// a moment after answering instead of closing on unread bytes, which would reset the
/// connection and fail the client's send (on Linux the 400 itself survives the reset, but a
/// client whose send fails usually reports that instead of reading the answer).
#[tokio::test]
async fn a_refusal_reaches_a_client_that_is_still_sending() {
    let gw = start().await;
    let body = chunked(&format!(
        "{{\"project_ids\": [\"{}\"]}}",
        "p".repeat(4 << 20)
    ));
    let framing = format!(
        "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
        body.len()
    );
    let all = send_all_then_read(gw.addr, format!("{}{body}", post_head(&framing))).await;
    all[0].assert_refusal("still sending");
    assert!(gw.mock.requests().is_empty());
}

/// Heads that arrive one byte per write are checked all the same.
#[tokio::test]
async fn requests_sent_byte_by_byte_are_checked_the_same() {
    let gw = start().await;
    let addr = gw.addr;
    let send = |bytes: String| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        for byte in bytes.as_bytes() {
            if stream.write_all(&[*byte]).await.is_err() {
                break; // Answered and closed early.
            }
        }
        let (received, error) = read_to_close(&mut stream).await;
        assert_eq!(error, None);
        raw_responses(&received)
    };
    let all = send(ambiguous_post()).await;
    assert_eq!(all.len(), 1, "{all:?}");
    all[0].assert_refusal("byte by byte");
    assert!(gw.mock.requests().is_empty());

    let good = post_head("Transfer-Encoding: chunked\r\n");
    let all = send(format!("{good}{}{CANARY}", chunked(BODY))).await;
    let statuses: Vec<u16> = all.iter().map(|r| r.status).collect();
    assert_eq!(statuses, [200, 404], "{all:?}");
    assert_eq!(gw.mock.count(&Method::POST), 1);
}

/// HTTP/2 with prior knowledge passes the guard untouched, and h2 itself refuses a request
/// carrying `transfer-encoding` (a connection-specific field, RFC 9113 8.2.2) with a stream
/// reset, before permgate sees it.
#[tokio::test]
async fn http2_is_untouched_and_refuses_transfer_encoding_itself() {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let gw = start().await;
    let stream = TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    for (method, body) in [(Method::GET, ""), (Method::POST, BODY)] {
        let req = hyper::Request::builder()
            .method(method.clone())
            .uri(format!("http://permgate.test{}", list_path(CP)))
            .header("authorization", format!("Bearer {WRITER}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = tokio::time::timeout(GUARD, sender.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), 200, "{method}");
        let _ = resp.into_body().collect().await.unwrap();
    }
    assert_eq!(gw.mock.count(&Method::POST), 1);

    let frames = h2_post_with_transfer_encoding(gw.addr).await;
    assert!(
        frames.contains(&(0x3, 1)),
        "RST_STREAM on stream 1: {frames:?}"
    );
    assert!(
        !frames.contains(&(0x1, 1)),
        "no answer on stream 1: {frames:?}"
    );
    assert_eq!(gw.mock.count(&Method::POST), 1, "nothing more upstream");
}

/// Sends a raw HTTP/2 POST (HPACK literals) with `transfer-encoding: chunked`; returns the
/// (type, stream) of every frame the server sends until it resets stream 1 or goes away.
async fn h2_post_with_transfer_encoding(addr: SocketAddr) -> Vec<(u8, u32)> {
    let path = list_path(CP);
    let bearer = format!("Bearer {WRITER}");
    let fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path.as_str()),
        (":authority", "permgate.test"),
        ("authorization", bearer.as_str()),
        ("transfer-encoding", "chunked"),
    ];
    let mut block = Vec::new();
    for (name, value) in fields {
        // Literal header field without indexing, new name; lengths fit the 7-bit prefix.
        block.push(0);
        block.push(u8::try_from(name.len()).unwrap());
        block.extend_from_slice(name.as_bytes());
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    }
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    bytes.extend(frame(0x1, 0x5, 1, &block)); // HEADERS, END_STREAM | END_HEADERS
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(&bytes).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let mut header = [0u8; 9];
        let read = tokio::time::timeout(GUARD, stream.read_exact(&mut header)).await;
        if !matches!(read, Ok(Ok(_))) {
            return seen;
        }
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let kind = header[3];
        let id = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        tokio::time::timeout(GUARD, stream.read_exact(&mut payload))
            .await
            .unwrap()
            .unwrap();
        seen.push((kind, id));
        if (kind == 0x3 && id == 1) || kind == 0x7 {
            return seen;
        }
    }
}
