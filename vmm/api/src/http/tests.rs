use super::*;

fn ok(buf: &[u8]) -> Request {
    match parse_request(buf) {
        Ok(Some(request)) => request,
        other => panic!(
            "{:?} did not parse: {other:?}",
            String::from_utf8_lossy(buf)
        ),
    }
}

fn err(buf: &[u8]) -> HttpError {
    match parse_request(buf) {
        Err(e) => e,
        other => panic!("{:?} was accepted: {other:?}", String::from_utf8_lossy(buf)),
    }
}

#[test]
fn parses_get_and_put_with_body() {
    let get = ok(b"GET /v1/vm HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(
        (get.method.as_str(), get.path.as_str(), get.body.len()),
        ("GET", "/v1/vm", 0)
    );

    let put = ok(b"PUT /v1/vm/snapshot HTTP/1.1\r\ncontent-LENGTH: 4\r\n\r\nabcdEXTRA");
    assert_eq!(put.method, "PUT");
    assert_eq!(
        put.body, b"abcd",
        "bytes past Content-Length are not the body"
    );
}

#[test]
fn accepts_bare_lf_http10_and_strips_query() {
    let request = ok(b"GET /v1/vm?pretty=1 HTTP/1.0\nAccept: */*\n\n");
    assert_eq!(request.path, "/v1/vm");
}

#[test]
fn every_proper_prefix_of_a_request_is_incomplete() {
    let full = b"PUT /v1/vm/snapshot HTTP/1.1\r\nContent-Length: 11\r\n\r\n{\"dir\":\"/\"}";
    for cut in 0..full.len() {
        assert_eq!(
            parse_request(&full[..cut]),
            Ok(None),
            "prefix of {cut} bytes"
        );
    }
    assert_eq!(ok(full).body, b"{\"dir\":\"/\"}");
}

#[test]
fn rejects_malformed_request_lines() {
    for bad in [
        &b"\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"GET /v1/vm\r\n\r\n",
        b"GET  /v1/vm HTTP/1.1\r\n\r\n",
        b"GET /v1/vm HTTP/1.1 extra\r\n\r\n",
        b"GET v1/vm HTTP/1.1\r\n\r\n",
        b"GET http://x/v1/vm HTTP/1.1\r\n\r\n",
        b"G(T /v1/vm HTTP/1.1\r\n\r\n",
        b"GET /v1/vm FTP/1.1\r\n\r\n",
        b"GET /v1/\x7fvm HTTP/1.1\r\n\r\n",
        b"GET /v1/vm\xff HTTP/1.1\r\n\r\n",
        b"\x00\x01\x02\n\n",
    ] {
        assert!(
            matches!(err(bad), HttpError::Malformed(_)),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    assert_eq!(
        err(b"GET /v1/vm HTTP/2.0\r\n\r\n"),
        HttpError::VersionNotSupported
    );
}

#[test]
fn rejects_malformed_headers() {
    for bad in [
        &b"GET / HTTP/1.1\r\nNoColon\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET / HTTP/1.1\r\n: empty name\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n",
        b"GET / HTTP/1.1\r\nA: b\x01c\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: \r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    ] {
        assert!(
            matches!(err(bad), HttpError::Malformed(_)),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
    }
    // The same length twice is harmless.
    assert_eq!(
        ok(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx").body,
        b"x"
    );
}

#[test]
fn enforces_size_limits() {
    let too_long = format!(
        "PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY_BYTES + 1
    );
    assert_eq!(err(too_long.as_bytes()), HttpError::BodyTooLarge);
    assert_eq!(
        err(b"PUT / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
        HttpError::BodyTooLarge
    );
    let at_limit = format!("PUT / HTTP/1.1\r\nContent-Length: {MAX_BODY_BYTES}\r\n\r\n");
    assert_eq!(
        parse_request(at_limit.as_bytes()),
        Ok(None),
        "a 1 MiB body is allowed"
    );

    let endless_head = vec![b'a'; MAX_HEAD_BYTES];
    assert_eq!(err(&endless_head), HttpError::HeadTooLarge);
    let mut long_head = b"GET / HTTP/1.1\r\nX: ".to_vec();
    long_head.resize(MAX_HEAD_BYTES + 10, b'y');
    long_head.extend_from_slice(b"\r\n\r\n");
    assert_eq!(err(&long_head), HttpError::HeadTooLarge);

    let mut many = String::from("GET / HTTP/1.1\r\n");
    for i in 0..=MAX_HEADERS {
        many.push_str(&format!("X-{i}: y\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(err(many.as_bytes()), HttpError::HeadTooLarge);
}

#[test]
fn chunked_bodies_need_content_length() {
    assert_eq!(
        err(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"),
        HttpError::LengthRequired
    );
    assert_eq!(
        err(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").status(),
        411
    );
}

#[test]
fn reads_expect_continue() {
    let buf = b"PUT / HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n";
    let (head_len, _) = find_head_end(buf, 0).unwrap();
    assert!(parse_head(&buf[..head_len]).unwrap().expects_continue);
}

#[test]
fn responses_round_trip_through_the_response_parser() {
    let response = Response::error(405, "use PUT").with_allow("PUT");
    let bytes = response.to_bytes();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
        "{text}"
    );
    assert!(text.contains("\r\nAllow: PUT\r\n"), "{text}");
    assert!(text.contains("\r\nConnection: close\r\n"), "{text}");
    let parsed = parse_response(&bytes).unwrap();
    assert_eq!(parsed.status, 405);
    assert_eq!(parsed.body, br#"{"error":"use PUT"}"#);

    let empty = Response::no_content().to_bytes();
    let text = String::from_utf8(empty.clone()).unwrap();
    assert!(
        !text.contains("Content-Length") && !text.contains("Content-Type"),
        "{text}"
    );
    assert_eq!(
        parse_response(&empty).unwrap(),
        ParsedResponse {
            status: 204,
            body: vec![]
        }
    );
}

#[test]
fn response_parser_rejects_truncation_and_garbage() {
    assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc").is_err());
    assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n").is_err());
    assert!(parse_response(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    assert!(parse_response(b"HTTP/1.1 2000 OK\r\n\r\n").is_err());
    assert!(parse_response(b"HTTP/1.1 abc OK\r\n\r\n").is_err());
}

/// xorshift64*: deterministic, dependency-free randomness for the property test below.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const FRAGMENTS: &[&[u8]] = &[
    b"GET ",
    b"PUT ",
    b"/v1/vm",
    b"/v1/vm/snapshot",
    b" HTTP/1.1",
    b" HTTP/1.0",
    b"\r\n",
    b"\n",
    b"\r",
    b"\r\n\r\n",
    b"\n\n",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked",
    b"Expect: 100-continue",
    b": ",
    b" ",
    b"\t",
    b"0",
    b"7",
    b"18446744073709551616",
    b"1048577",
    b"{\"dir\":\"/x\"}",
    b"\xff",
    b"\0",
];

fn random_input(rng: &mut Rng) -> Vec<u8> {
    let mut buf = Vec::new();
    match rng.below(3) {
        // Raw noise.
        0 => (0..rng.below(400)).for_each(|_| buf.push(rng.next() as u8)),
        // HTTP-shaped pieces in random order.
        1 => (0..rng.below(24))
            .for_each(|_| buf.extend_from_slice(FRAGMENTS[rng.below(FRAGMENTS.len())])),
        // A valid request, mutated.
        _ => {
            buf.extend_from_slice(
                b"PUT /v1/vm/snapshot HTTP/1.1\r\nContent-Length: 12\r\n\r\n{\"dir\":\"/x\"}",
            );
            for _ in 0..=rng.below(4) {
                let at = rng.below(buf.len() + 1);
                match rng.below(3) {
                    0 if at < buf.len() => buf[at] = rng.next() as u8,
                    1 if at < buf.len() => {
                        buf.remove(at);
                    }
                    _ => {
                        let fragment = FRAGMENTS[rng.below(FRAGMENTS.len())];
                        buf.splice(at..at, fragment.iter().copied());
                    }
                }
            }
        }
    }
    buf
}

/// The parser never panics, and it is incremental: the verdict on a prefix (complete request or
/// error) is the verdict on every extension of it, which is what the socket reader relies on.
#[test]
fn random_input_never_panics_and_verdicts_are_prefix_stable() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..20_000 {
        let input = random_input(&mut rng);
        let full = parse_request(&input);
        if let Ok(Some(request)) = &full {
            assert!(request.path.starts_with('/'));
            assert!(request.body.len() <= MAX_BODY_BYTES);
        }
        let cut = rng.below(input.len() + 1);
        match parse_request(&input[..cut]) {
            Ok(None) => {}
            prefix => assert_eq!(
                prefix,
                full,
                "input {:?} cut at {cut}",
                String::from_utf8_lossy(&input)
            ),
        }
        // Scanning for the blank line piecewise, as the server does, finds the same one.
        let mut scanned = 0;
        let mut piecewise = None;
        while scanned < input.len() && piecewise.is_none() {
            let end = (scanned + 1 + rng.below(16)).min(input.len());
            piecewise = find_head_end(&input[..end], scanned.saturating_sub(3));
            scanned = end;
        }
        assert_eq!(
            piecewise,
            find_head_end(&input, 0),
            "input {:?}",
            String::from_utf8_lossy(&input)
        );
        let _ = parse_response(&input);
    }
}

fn keep_alive(head: &str) -> bool {
    let buf = head.as_bytes();
    let (head_len, _) = find_head_end(buf, 0).unwrap();
    parse_head(&buf[..head_len]).unwrap().keep_alive
}

#[test]
fn connections_persist_unless_the_client_says_close() {
    assert!(keep_alive("GET / HTTP/1.1\r\n\r\n"));
    // HTTP/1.0 too, as Firecracker's server (firecracker-rs-sdk relies on it).
    assert!(keep_alive("GET / HTTP/1.0\r\n\r\n"));
    assert!(keep_alive(
        "GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    ));
    assert!(!keep_alive("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
    assert!(!keep_alive("GET / HTTP/1.0\r\nconnection: CLOSE\r\n\r\n"));
    assert!(!keep_alive(
        "GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n"
    ));
    assert!(!keep_alive(
        "GET / HTTP/1.1\r\nConnection: TE\r\nConnection: close\r\n\r\n"
    ));
    // A token that merely contains the word is not `close`.
    assert!(keep_alive("GET / HTTP/1.1\r\nConnection: closed\r\n\r\n"));
    let kept = String::from_utf8(Response::no_content().render(true)).unwrap();
    assert!(
        kept.ends_with("\r\nConnection: keep-alive\r\n\r\n"),
        "{kept}"
    );
    let closed = String::from_utf8(Response::no_content().render(false)).unwrap();
    assert!(
        closed.ends_with("\r\nConnection: close\r\n\r\n"),
        "{closed}"
    );
}
