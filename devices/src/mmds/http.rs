//! One guest HTTP request to the MMDS, answered as Firecracker's `mmds/mod.rs` does: GET reads
//! the store (V2: only with a valid token), PUT `/latest/api/token` issues a token, anything
//! else is 405. Pure over bytes: the caller bounds what it buffers.

use std::time::Instant;

use super::store::{MmdsVersion, OutputFormat, StoreError};
use super::Mmds;

/// Largest request head (request line and headers) a connection buffers.
pub const MAX_REQUEST_LEN: usize = 4096;
const PATH_TO_TOKEN: &str = "/latest/api/token";
const TOKEN_HEADERS: [&str; 2] = ["x-metadata-token", "x-aws-ec2-metadata-token"];
const TTL_HEADERS: [&str; 2] = [
    "x-metadata-token-ttl-seconds",
    "x-aws-ec2-metadata-token-ttl-seconds",
];

/// What a connection's bytes so far amount to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// The head is not complete yet.
    Incomplete,
    /// The full response to send, after which the connection closes.
    Response(Vec<u8>),
}

struct Request<'a> {
    method: &'a str,
    target: &'a str,
    http10: bool,
    headers: Vec<(&'a str, &'a str)>,
}

impl<'a> Request<'a> {
    fn header(&self, names: &[&str]) -> Option<(&'a str, &'a str)> {
        names.iter().find_map(|name| {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .copied()
        })
    }
}

fn parse_head(head: &str) -> Option<Request<'_>> {
    let mut lines = head.split("\r\n");
    let mut parts = lines.next()?.split(' ');
    let method = parts.next().filter(|m| !m.is_empty())?;
    let target = parts.next()?;
    let version = parts.next()?;
    if parts.next().is_some() {
        return None;
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return None,
    };
    let headers = lines
        .filter(|l| !l.is_empty())
        .map(|l| l.split_once(':').map(|(n, v)| (n.trim(), v.trim())))
        .collect::<Option<Vec<_>>>()?;
    Some(Request {
        method,
        target,
        http10,
        headers,
    })
}

fn response(
    http10: bool,
    status: u16,
    content_type: &str,
    body: &str,
    extra: &[(&str, String)],
) -> Vec<u8> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        _ => "Not Implemented",
    };
    let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
    let mut head = format!(
        "{version} {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in extra {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

fn text(http10: bool, status: u16, body: &str) -> Vec<u8> {
    response(http10, status, "text/plain", body, &[])
}

/// `//` collapsed, as Firecracker's `sanitize_uri`; an absolute URI reduced to its path.
fn path_of(target: &str) -> String {
    let path = match target.strip_prefix("http://") {
        Some(rest) => rest.find('/').map_or("", |i| rest.get(i..).unwrap_or("")),
        None => target,
    };
    let mut out = String::with_capacity(path.len());
    for c in path.chars() {
        if !(c == '/' && out.ends_with('/')) {
            out.push(c);
        }
    }
    out
}

/// A GET's session token, when it is one the metrics count (Firecracker's `rx_no_token` and
/// `rx_invalid_token`: in V2 the request got a 401, in V1 it was served anyway).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenProblem {
    Missing,
    Invalid,
}

/// Answers the request in `bytes` (the connection's data so far).
pub fn handle(mmds: &mut Mmds, bytes: &[u8], now: Instant) -> Parsed {
    handle_noting(mmds, bytes, now).0
}

/// `handle`, also saying what was wrong with a GET's token, for the metrics.
pub fn handle_noting(
    mmds: &mut Mmds,
    bytes: &[u8],
    now: Instant,
) -> (Parsed, Option<TokenProblem>) {
    let mut problem = None;
    let parsed = parse_and_answer(mmds, bytes, now, &mut problem);
    (parsed, problem)
}

fn parse_and_answer(
    mmds: &mut Mmds,
    bytes: &[u8],
    now: Instant,
    problem: &mut Option<TokenProblem>,
) -> Parsed {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        if bytes.len() >= MAX_REQUEST_LEN {
            return Parsed::Response(text(false, 400, "Request is too large."));
        }
        return Parsed::Incomplete;
    };
    let request = std::str::from_utf8(bytes.get(..end).unwrap_or_default())
        .ok()
        .and_then(parse_head);
    let Some(request) = request else {
        return Parsed::Response(text(false, 400, "Invalid request."));
    };
    Parsed::Response(answer(mmds, &request, now, problem))
}

fn answer(
    mmds: &mut Mmds,
    request: &Request,
    now: Instant,
    problem: &mut Option<TokenProblem>,
) -> Vec<u8> {
    let http10 = request.http10;
    let path = path_of(request.target);
    if path.is_empty() {
        return text(http10, 400, "Invalid URI.");
    }
    match request.method {
        "GET" => {
            // Counted in V1 too, as Firecracker: it shows guests not yet ready for V2.
            *problem = match request.header(&TOKEN_HEADERS) {
                None => Some(TokenProblem::Missing),
                Some((_, token)) if !mmds.tokens.is_valid(token, now) => {
                    Some(TokenProblem::Invalid)
                }
                Some(_) => None,
            };
            if mmds.store.version() == MmdsVersion::V2 {
                match problem {
                    Some(TokenProblem::Missing) => {
                        return text(
                            http10,
                            401,
                            "No MMDS token provided. Use `X-metadata-token` or \
                             `X-aws-ec2-metadata-token` header to specify the session token.",
                        )
                    }
                    Some(TokenProblem::Invalid) => {
                        return text(http10, 401, "MMDS token not valid.")
                    }
                    None => {}
                }
            }
            get(mmds, request, &path)
        }
        "PUT" => put_token(mmds, request, &path, now),
        _ => response(
            http10,
            405,
            "text/plain",
            "Not allowed HTTP method.",
            &[("Allow", "GET, PUT".to_string())],
        ),
    }
}

fn get(mmds: &Mmds, request: &Request, path: &str) -> Vec<u8> {
    let http10 = request.http10;
    let json = request
        .header(&["accept"])
        .is_some_and(|(_, v)| v.eq_ignore_ascii_case("application/json"));
    let (format, content_type) = if json {
        (OutputFormat::Json, "application/json")
    } else {
        (OutputFormat::Imds, "text/plain")
    };
    match mmds.store.get(path, format) {
        Ok(body) => response(http10, 200, content_type, &body, &[]),
        Err(StoreError::NotFound) => text(
            http10,
            404,
            &format!("Resource not found: {}.", request.target),
        ),
        Err(e) => text(http10, 501, &e.to_string()),
    }
}

fn put_token(mmds: &mut Mmds, request: &Request, path: &str, now: Instant) -> Vec<u8> {
    let http10 = request.http10;
    if request.header(&["x-forwarded-for"]).is_some() {
        return text(http10, 400, "Unsupported header name. Key: X-Forwarded-For");
    }
    if path != PATH_TO_TOKEN {
        return text(
            http10,
            404,
            &format!("Resource not found: {}.", request.target),
        );
    }
    let Some((name, value)) = request.header(&TTL_HEADERS) else {
        return text(
            http10,
            400,
            "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or \
             `X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime.",
        );
    };
    let Ok(ttl) = value.parse::<u32>() else {
        return text(
            http10,
            400,
            &format!("Invalid value. Key:{name}; Value:{value}"),
        );
    };
    match mmds.tokens.generate(ttl, now) {
        Ok(token) => response(
            http10,
            200,
            "text/plain",
            &token,
            &[(name, ttl.to_string())],
        ),
        Err(e) => text(http10, 400, &e.to_string()),
    }
}
