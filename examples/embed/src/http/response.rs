//! Answers: the [`Response`] a service returns, OpenAI's error shape for every refusal, and how an
//! answer is written on the wire (status line, headers, body).

use std::io::Write;

/// One answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
    /// The `Allow` header of a 405.
    pub allow: Option<&'static str>,
}

impl Response {
    /// A JSON answer.
    pub fn json(status: u16, body: Vec<u8>) -> Self {
        Self {
            status,
            content_type: "application/json",
            body,
            allow: None,
        }
    }

    /// The error shape of every 4xx/5xx answer, OpenAI's:
    /// `{"error": {"message", "type", "code", "param"}}`.
    pub fn error(status: u16, code: &str, message: &str, param: Option<&str>) -> Self {
        let kind = if status >= 500 {
            "server_error"
        } else {
            "invalid_request_error"
        };
        let body = serde_json::json!({
            "error": { "message": message, "type": kind, "code": code, "param": param }
        });
        Self::json(status, body.to_string().into_bytes())
    }

    /// Serialises the answer (status line, headers, body unless `head_only`). Every answer
    /// names the worker process that made it (`X-Worker-Pid`), so a client or a benchmark can
    /// see how load spreads and when a restarted worker answers first.
    pub(super) fn write_to(&self, out: &mut Vec<u8>, close: bool, head_only: bool) {
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n\
             X-Worker-Pid: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len(),
            if close { "close" } else { "keep-alive" },
            std::process::id()
        );
        if let Some(allow) = self.allow {
            let _ = write!(out, "Allow: {allow}\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.body);
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Content Too Large",
        417 => "Expectation Failed",
        422 => "Unprocessable Content",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}
