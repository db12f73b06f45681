//! The request parser: the head of an HTTP/1.x request (request line and headers, through
//! `httparse`), checked against the worker's [`Limits`], and whether its body has arrived.
//! Pure: bytes in, a [`Parsed`] verdict out, no I/O. This is the entry point the fuzzer drives
//! with arbitrary bytes; it never panics.

use super::Limits;

/// Most header lines in a request (431 beyond).
pub const MAX_HEADERS: usize = 64;

/// The parsed head of a complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    pub path: String,
    pub keep_alive: bool,
    pub head_len: usize,
    pub body_len: usize,
}

/// What the bytes received so far hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Not a whole request yet. `expect_continue`: the head is complete, its body is still to
    /// come, and the client waits for `100 Continue` before sending it.
    Incomplete {
        expect_continue: bool,
    },
    Complete(Head),
    /// Not a request this server takes: answer and close.
    Reject {
        status: u16,
        code: &'static str,
        message: String,
    },
}

fn reject(status: u16, code: &'static str, message: impl Into<String>) -> Parsed {
    Parsed::Reject {
        status,
        code,
        message: message.into(),
    }
}

/// Parses the start of `buf` as an HTTP/1.x request, within `limits`. Never panics.
pub fn parse(buf: &[u8], limits: &Limits) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Partial) => {
            if buf.len() > limits.max_header_bytes {
                return reject(
                    431,
                    "headers_too_large",
                    format!("request headers exceed {} bytes", limits.max_header_bytes),
                );
            }
            return Parsed::Incomplete {
                expect_continue: false,
            };
        }
        Ok(httparse::Status::Complete(n)) => n,
        Err(httparse::Error::TooManyHeaders) => {
            return reject(
                431,
                "headers_too_large",
                format!("more than {MAX_HEADERS} header lines"),
            )
        }
        Err(httparse::Error::Version) => {
            return reject(505, "http_version", "only HTTP/1.0 and HTTP/1.1 are served")
        }
        Err(e) => {
            return reject(
                400,
                "malformed_request",
                format!("malformed HTTP request: {e}"),
            )
        }
    };
    if head_len > limits.max_header_bytes {
        return reject(
            431,
            "headers_too_large",
            format!("request headers exceed {} bytes", limits.max_header_bytes),
        );
    }
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return reject(400, "malformed_request", "malformed HTTP request line");
    };
    let mut content_length: Option<usize> = None;
    let mut hosts = 0;
    let (mut close, mut keep_alive, mut expect_continue) = (false, false, false);
    for h in req.headers.iter() {
        let value = String::from_utf8_lossy(h.value);
        let value = value.trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            // Digits only, as hyper and nginx take it: `usize::from_str` would also take `+17`.
            let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
            let (true, Ok(n)) = (digits, value.parse::<usize>()) else {
                return reject(
                    400,
                    "malformed_request",
                    format!("invalid Content-Length {value:?}"),
                );
            };
            if content_length.is_some_and(|m| m != n) {
                return reject(
                    400,
                    "malformed_request",
                    "conflicting Content-Length headers",
                );
            }
            content_length = Some(n);
        } else if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return reject(
                501,
                "chunked_not_supported",
                "Transfer-Encoding is not supported: send the body with a Content-Length",
            );
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if h.name.eq_ignore_ascii_case("expect") {
            if !value.eq_ignore_ascii_case("100-continue") {
                return reject(
                    417,
                    "expectation_failed",
                    format!("unsupported Expect: {value:?}"),
                );
            }
            expect_continue = true;
        }
    }
    let body_len = content_length.unwrap_or(0);
    if body_len > limits.max_body {
        return reject(
            413,
            "body_too_large",
            format!(
                "request body of {body_len} bytes exceeds the limit of {} bytes",
                limits.max_body
            ),
        );
    }
    // RFC 9112 §3.2: an HTTP/1.1 request carries exactly one Host (nginx answers 400 too).
    if version == 1 && hosts != 1 {
        return reject(
            400,
            "malformed_request",
            if hosts == 0 {
                "an HTTP/1.1 request must have a Host header"
            } else {
                "more than one Host header"
            },
        );
    }
    if buf.len() - head_len < body_len {
        return Parsed::Incomplete { expect_continue };
    }
    let keep_alive = if version == 1 {
        !close
    } else {
        keep_alive && !close
    };
    let path = target.split(['?', '#']).next().unwrap_or_default();
    Parsed::Complete(Head {
        method: method.to_string(),
        path: path.to_string(),
        keep_alive,
        head_len,
        body_len,
    })
}
