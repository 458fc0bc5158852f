//! Just enough HTTP/1.1 over a Unix socket for Firecracker's and Cloud Hypervisor's APIs: one
//! request per connection, JSON bodies, `Content-Length` responses.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context};

/// One API call: what the peer runners build and the unit tests check.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiCall {
    pub method: &'static str,
    pub path: String,
    pub body: Option<serde_json::Value>,
}

impl ApiCall {
    pub fn new(method: &'static str, path: &str, body: Option<serde_json::Value>) -> Self {
        ApiCall {
            method,
            path: path.to_string(),
            body,
        }
    }

    /// The request's bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let body = self
            .body
            .as_ref()
            .map(serde_json::Value::to_string)
            .unwrap_or_default();
        format!(
            "{} {} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.method,
            self.path,
            body.len()
        )
        .into_bytes()
    }

    /// Sends the call on `stream` and fails unless the answer is a 2xx status.
    pub fn send(&self, mut stream: UnixStream, timeout: Duration) -> anyhow::Result<String> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream
            .write_all(&self.to_bytes())
            .with_context(|| format!("sending {} {}", self.method, self.path))?;
        let (status, body) = read_response(&mut stream)
            .with_context(|| format!("reading the answer to {} {}", self.method, self.path))?;
        if !(200..300).contains(&status) {
            bail!("{} {} answered {status}: {body}", self.method, self.path);
        }
        Ok(body)
    }
}

/// Largest response head or body read: the APIs answer with a few hundred bytes.
const MAX_RESPONSE: usize = 1 << 20;

fn read_response(stream: &mut UnixStream) -> anyhow::Result<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(parsed) = parse_response(&buf)? {
            return Ok(parsed);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!(
                "the connection closed mid-answer: {:?}",
                String::from_utf8_lossy(&buf)
            );
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if buf.len() > MAX_RESPONSE {
            bail!("answer longer than {MAX_RESPONSE} bytes");
        }
    }
}

/// `Ok(None)` while more bytes are needed; the status code and body once complete.
pub fn parse_response(buf: &[u8]) -> anyhow::Result<Option<(u16, String)>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = String::from_utf8_lossy(buf.get(..head_end).unwrap_or_default());
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .context("bad Content-Length")?
        .unwrap_or(0);
    let body_start = head_end + 4;
    let Some(body) = buf.get(body_start..body_start.saturating_add(length)) else {
        return Ok(None);
    };
    Ok(Some((status, String::from_utf8_lossy(body).into_owned())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_carries_a_json_body_and_its_length() {
        let call = ApiCall::new("PUT", "/actions", Some(serde_json::json!({"a": 1})));
        let text = String::from_utf8(call.to_bytes()).unwrap();
        assert!(text.starts_with("PUT /actions HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("Content-Length: 7\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{\"a\":1}"), "{text}");
        let empty = ApiCall::new("PUT", "/api/v1/vm.pause", None);
        assert!(String::from_utf8(empty.to_bytes())
            .unwrap()
            .contains("Content-Length: 0\r\n\r\n"));
    }

    #[test]
    fn responses_parse_only_when_complete() {
        assert_eq!(
            parse_response(b"HTTP/1.1 204 No Content\r\n").unwrap(),
            None
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n").unwrap(),
            Some((204, String::new()))
        );
        let partial = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 10\r\n\r\n{\"fault";
        assert_eq!(parse_response(partial).unwrap(), None);
        let full = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 10\r\n\r\n{\"fault\":1";
        assert_eq!(
            parse_response(full).unwrap(),
            Some((400, "{\"fault\":1".to_string()))
        );
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n").is_err());
    }
}
