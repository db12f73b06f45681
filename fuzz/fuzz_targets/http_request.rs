//! Fuzz target: the example app's HTTP/1.x request parser (examples/embed/src/http.rs).
//!
//! The input is what a connection received. It is parsed the way a connection does it: a
//! complete request is consumed (head and body) and the rest parsed again, as pipelined
//! requests are. The first byte picks the default limits or tight ones, so that the 413/431
//! paths are reached with small inputs. A complete request must lie within the bytes received
//! and within the limits.
//!
//! Calls: `http::parse`, `http::Limits` (fields `max_header_bytes`, `max_body`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use zygote_embed::http::{self, Limits, Parsed};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, mut buf)) = data.split_first() else {
        return;
    };
    let limits = if pick & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            max_header_bytes: 128,
            max_body: 32,
            ..Limits::default()
        }
    };
    while let Parsed::Complete(head) = http::parse(buf, &limits) {
        assert!(head.head_len > 0 && head.head_len <= limits.max_header_bytes);
        assert!(head.body_len <= limits.max_body);
        let used = head.head_len + head.body_len;
        assert!(
            used <= buf.len(),
            "a complete request past the bytes received"
        );
        assert!(!head.path.contains(['?', '#']));
        buf = &buf[used..];
    }
});
