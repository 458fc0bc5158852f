//! Just enough HTTP/1.1 for the control API, both sides: a strict, bounded request parser for
//! the server, a response renderer, and a response parser for the client. Everything here works
//! on byte slices and never panics on any input, so it is tested (and fuzzable) without sockets.

use serde::Serialize;

use super::types::ErrorBody;

/// Request line plus headers, blank line included.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// More headers than any real client of this API sends; bounds the work per request.
pub const MAX_HEADERS: usize = 64;

/// Why a request could not be read; each maps to the status the server answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("malformed HTTP request: {0}")]
    Malformed(&'static str),
    #[error("request header section exceeds {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers")]
    HeadTooLarge,
    #[error("request body exceeds {MAX_BODY_BYTES} bytes")]
    BodyTooLarge,
    #[error(
        "request bodies need a Content-Length header (chunked transfer coding is not supported)"
    )]
    LengthRequired,
    #[error("HTTP version not supported: use HTTP/1.1")]
    VersionNotSupported,
    #[error("the request was not received in time")]
    Timeout,
    #[error("the connection ended before the request was complete")]
    Truncated,
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::Malformed(_) | HttpError::Truncated => 400,
            HttpError::Timeout => 408,
            HttpError::LengthRequired => 411,
            HttpError::BodyTooLarge => 413,
            HttpError::HeadTooLarge => 431,
            HttpError::VersionNotSupported => 505,
        }
    }
}

/// What the server needs from a request line and its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The target without its query string (the API has no query parameters).
    pub path: String,
    pub content_length: usize,
    /// The client sent `Expect: 100-continue` and waits for a go-ahead before the body.
    pub expects_continue: bool,
    /// The connection may carry another request after this one's answer.
    pub keep_alive: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Finds the blank line ending a message head, scanning from `from`. Returns the length of the
/// head (its last line's `\n` included) and where the body starts. Bare `\n` line ends are
/// accepted, as RFC 9112 allows.
pub fn find_head_end(buf: &[u8], from: usize) -> Option<(usize, usize)> {
    let tail = buf.get(from..)?;
    for (offset, byte) in tail.iter().enumerate() {
        if *byte != b'\n' {
            continue;
        }
        let at = from.checked_add(offset)?;
        let after = at.checked_add(1)?;
        match (buf.get(after), buf.get(after.checked_add(1)?)) {
            (Some(b'\n'), _) => return Some((after, after.checked_add(1)?)),
            (Some(b'\r'), Some(b'\n')) => return Some((after, after.checked_add(2)?)),
            _ => {}
        }
    }
    None
}

/// `tchar` of RFC 9110: the characters of methods and header names.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Lines of a head without their line ends; a stray `\r` inside a line is an error (it is a
/// classic request-smuggling vector).
fn head_lines(head: &str) -> impl Iterator<Item = Result<&str, HttpError>> {
    head.split_terminator('\n').map(|line| {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.contains('\r') {
            Err(HttpError::Malformed("bare carriage return"))
        } else {
            Ok(line)
        }
    })
}

fn parse_request_line(line: &str) -> Result<(String, String), HttpError> {
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Malformed(
            "request line is not `METHOD TARGET HTTP/1.1`",
        ));
    };
    match version {
        "HTTP/1.1" | "HTTP/1.0" => {}
        v if v.starts_with("HTTP/") => return Err(HttpError::VersionNotSupported),
        _ => {
            return Err(HttpError::Malformed(
                "request line does not end with an HTTP version",
            ))
        }
    }
    if !is_token(method) {
        return Err(HttpError::Malformed("invalid method"));
    }
    if !target.starts_with('/') || !target.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(HttpError::Malformed(
            "request target must be an absolute path",
        ));
    }
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    Ok((method.to_string(), path.to_string()))
}

fn parse_content_length(value: &str) -> Result<usize, HttpError> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(HttpError::Malformed("invalid Content-Length"));
    }
    // All digits: a parse failure can only be overflow, i.e. far too large.
    let length: u64 = value.parse().map_err(|_| HttpError::BodyTooLarge)?;
    let length = usize::try_from(length).map_err(|_| HttpError::BodyTooLarge)?;
    if length > MAX_BODY_BYTES {
        return Err(HttpError::BodyTooLarge);
    }
    Ok(length)
}

/// Parses a request head (as delimited by [`find_head_end`], blank line excluded).
pub fn parse_head(head: &[u8]) -> Result<Head, HttpError> {
    if head.len() > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let head =
        std::str::from_utf8(head).map_err(|_| HttpError::Malformed("request head is not UTF-8"))?;
    let mut lines = head_lines(head);
    let request_line = lines
        .next()
        .ok_or(HttpError::Malformed("empty request"))??;
    let (method, path) = parse_request_line(request_line)?;

    let mut content_length: Option<usize> = None;
    let mut chunked = false;
    let mut expects_continue = false;
    let mut close = false;
    for (count, line) in lines.enumerate() {
        let line = line?;
        if count >= MAX_HEADERS {
            return Err(HttpError::HeadTooLarge);
        }
        if line.starts_with([' ', '\t']) {
            return Err(HttpError::Malformed("obsolete header line folding"));
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("header line without a colon"))?;
        if !is_token(name) {
            return Err(HttpError::Malformed("invalid header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(HttpError::Malformed("control character in a header value"));
        }
        if name.eq_ignore_ascii_case("content-length") {
            let length = parse_content_length(value)?;
            if content_length.is_some_and(|previous| previous != length) {
                return Err(HttpError::Malformed("conflicting Content-Length headers"));
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = true;
        } else if name.eq_ignore_ascii_case("expect") {
            expects_continue = value.eq_ignore_ascii_case("100-continue");
        } else if name.eq_ignore_ascii_case("connection") {
            close |= value.split(',').any(|option| {
                option
                    .trim_matches([' ', '\t'])
                    .eq_ignore_ascii_case("close")
            });
        }
    }
    if chunked {
        return Err(HttpError::LengthRequired);
    }
    Ok(Head {
        method,
        path,
        content_length: content_length.unwrap_or(0),
        expects_continue,
        // Persistent unless the client says `Connection: close`, HTTP/1.0 included: that is
        // what Firecracker's server does, and firecracker-rs-sdk sends HTTP/1.0 requests on one
        // connection it never reopens. Answers always carry their length (or are 204), so an
        // HTTP/1.0 client that does not reuse the connection still sees where each one ends.
        keep_alive: !close,
    })
}

/// Parses a whole request from `buf`: `Ok(None)` while more bytes are needed. The server reads
/// incrementally with the same pieces; this form is for tests and fuzzing.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let Some((head_len, body_start)) = find_head_end(buf, 0) else {
        return if buf.len() >= MAX_HEAD_BYTES {
            Err(HttpError::HeadTooLarge)
        } else {
            Ok(None)
        };
    };
    if body_start > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let head = parse_head(buf.get(..head_len).unwrap_or_default())?;
    let rest = buf.get(body_start..).unwrap_or_default();
    Ok(rest.get(..head.content_length).map(|body| Request {
        method: head.method,
        path: head.path,
        body: body.to_vec(),
    }))
}

pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// A response the server sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// JSON (or `content_type`), or `None` for 204.
    pub body: Option<Vec<u8>>,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
    /// The body's `Content-Type`.
    pub content_type: &'static str,
}

const JSON: &str = "application/json";

impl Response {
    pub fn json(status: u16, value: &impl Serialize) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Response {
                status,
                body: Some(body),
                allow: None,
                content_type: JSON,
            },
            Err(e) => Response::error(500, format!("cannot encode the response: {e}")),
        }
    }

    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
            allow: None,
            content_type: JSON,
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        let body = ErrorBody {
            error: message.into(),
        };
        // Serializing a struct of one String cannot fail; keep a fixed body just in case.
        let body =
            serde_json::to_vec(&body).unwrap_or_else(|_| br#"{"error":"internal error"}"#.to_vec());
        Response {
            status,
            body: Some(body),
            allow: None,
            content_type: JSON,
        }
    }

    /// A body that is not JSON (the Prometheus text of `GET /metrics`).
    pub fn text(status: u16, content_type: &'static str, body: String) -> Self {
        Response {
            status,
            body: Some(body.into_bytes()),
            allow: None,
            content_type,
        }
    }

    pub fn with_allow(mut self, methods: &'static str) -> Self {
        self.allow = Some(methods);
        self
    }

    /// The response, closing the connection after it.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.render(false)
    }

    /// The response, saying whether the connection stays open for another request.
    pub fn render(&self, keep_alive: bool) -> Vec<u8> {
        let body = self.body.as_deref().unwrap_or_default();
        let mut out = format!(
            "HTTP/1.1 {} {}\r\n",
            self.status,
            reason_phrase(self.status)
        );
        if self.body.is_some() {
            out.push_str(&format!("Content-Type: {}\r\n", self.content_type));
        }
        // RFC 9110 §8.6: no Content-Length on a 204, as Firecracker's server; clients such as
        // firecracker-rs-sdk decode a present one as a (then empty, invalid) JSON body.
        if self.status != 204 {
            out.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        if let Some(allow) = self.allow {
            out.push_str(&format!("Allow: {allow}\r\n"));
        }
        // Said either way: an HTTP/1.0 client assumes close unless told otherwise.
        out.push_str(if keep_alive {
            "Connection: keep-alive\r\n\r\n"
        } else {
            "Connection: close\r\n\r\n"
        });
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }
}

/// Status and body of a complete response (the client reads until the server closes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

pub fn parse_response(buf: &[u8]) -> Result<ParsedResponse, String> {
    let (head_len, body_start) =
        find_head_end(buf, 0).ok_or("response ended inside its header section")?;
    let head = std::str::from_utf8(buf.get(..head_len).unwrap_or_default())
        .map_err(|_| "response head is not UTF-8".to_string())?;
    let mut lines = head_lines(head);
    let status_line = lines
        .next()
        .ok_or("empty response")?
        .map_err(|e| e.to_string())?;
    let mut parts = status_line.splitn(3, ' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("bad status line {status_line:?}"));
    };
    if !version.starts_with("HTTP/1.") || code.len() != 3 {
        return Err(format!("bad status line {status_line:?}"));
    }
    let status: u16 = code
        .parse()
        .map_err(|_| format!("bad status code {code:?}"))?;
    let mut content_length = None;
    for line in lines {
        let line = line.map_err(|e| e.to_string())?;
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                let value = value.trim();
                let length: usize = value
                    .parse()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?;
                content_length = Some(length);
            }
        }
    }
    let rest = buf.get(body_start..).unwrap_or_default();
    let body = match content_length {
        Some(length) => rest
            .get(..length)
            .ok_or_else(|| format!("response body truncated ({} of {length} bytes)", rest.len()))?,
        None => rest,
    };
    Ok(ParsedResponse {
        status,
        body: body.to_vec(),
    })
}

#[cfg(test)]
mod tests;
