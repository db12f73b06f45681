//! Fuzz target: the wire format every zygote socket speaks (runtime/src/protocol).
//!
//! The input is a byte stream as a peer would send it. The first byte sets how many bytes each
//! read returns (1 to 16), and every other read answers `WouldBlock`, so the incremental
//! [`FrameReader`] sees frames split at every point, as a non-blocking socket delivers them.
//! Each whole frame is decoded as every message type a socket accepts; a message that decodes
//! must encode again, and that encoding must decode to the same bytes once more.
//!
//! Calls: `protocol::frame::FrameReader::read` (and through it `frame::check_len`),
//! `frame::decode`, `frame::encode`, `frame::error_code`.
#![no_main]

use std::io::{self, Read};

use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use zygote_runtime::protocol::frame::{self, FrameReader, ReadEvent};
use zygote_runtime::protocol::{
    AdminRequest, AdminResponse, ChildMessage, OwnerRequest, OwnerResponse, ParentMessage, Request,
    Response,
};

/// A socket that hands out `chunk` bytes at a time, with a `WouldBlock` between reads.
struct Trickle<'a> {
    data: &'a [u8],
    chunk: usize,
    blocked: bool,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.blocked = !self.blocked;
        if self.blocked && !self.data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.chunk.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Decodes `body` as `T`; if it is one, checks that its encoding is stable.
fn round_trip<T: Serialize + DeserializeOwned>(body: &[u8]) {
    let Ok(msg) = frame::decode::<T>(body) else {
        return;
    };
    let once = frame::encode(&msg).expect("a decoded message encodes");
    let back: T = frame::decode(&once[4..]).expect("an encoded message decodes");
    let twice = frame::encode(&back).expect("a decoded message encodes");
    assert_eq!(once, twice, "encoding is not stable across a decode");
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut socket = Trickle {
        data: stream,
        chunk: usize::from(chunk % 16) + 1,
        blocked: false,
    };
    let mut reader = FrameReader::default();
    loop {
        match reader.read(&mut socket) {
            Ok(ReadEvent::Frame(body)) => {
                assert!(!body.is_empty() && body.len() <= frame::MAX_FRAME);
                round_trip::<Request>(&body);
                round_trip::<Response>(&body);
                round_trip::<OwnerRequest>(&body);
                round_trip::<OwnerResponse>(&body);
                round_trip::<ChildMessage>(&body);
                round_trip::<ParentMessage>(&body);
                round_trip::<AdminRequest>(&body);
                round_trip::<AdminResponse>(&body);
            }
            Ok(ReadEvent::WouldBlock) => {}
            Ok(ReadEvent::Eof) => break,
            Err(e) => {
                let _ = frame::error_code(&e);
                break;
            }
        }
    }
});
