//! Length-prefixed CBOR frames: the one wire format of every zygote socket.
//!
//! A frame is a 4-byte big-endian length `N` (1 ≤ N ≤ [`MAX_FRAME`]) followed by `N` bytes of
//! one CBOR map. The map always holds `"v"` (the protocol version, [`VERSION`]) and `"type"`
//! (the message name); the other keys belong to the message. The length is checked before
//! anything is allocated, the version before the message is parsed, and a reader that has
//! started a frame must finish it within [`READ_DEADLINE`].
//!
//! File descriptors never ride inside a frame: a message that carries fds says how many, and
//! they follow the frame on the same socket, one `SCM_RIGHTS` message each ([`crate::fdpass`]).
//! Readers therefore read exactly the frame's bytes and no more.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_cbor::Value;

use super::{ErrorCode, ProtocolError};

/// The protocol version spoken by this build.
pub const VERSION: u32 = 1;
/// Largest frame body accepted, in bytes (1 MiB: a manifest of about 10 000 tensors fits).
pub const MAX_FRAME: usize = 1024 * 1024;
/// Time allowed to finish a frame (and the fds it announced) once its first byte arrived.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);

/// Encodes `msg` as a frame: length prefix, then the CBOR map with `"v"` added.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ProtocolError> {
    let value = serde_cbor::value::to_value(msg).map_err(ProtocolError::Encode)?;
    let Value::Map(mut map) = value else {
        return Err(ProtocolError::EncodeNotAMap);
    };
    map.insert(Value::Text("v".into()), Value::Integer(VERSION.into()));
    let body = serde_cbor::to_vec(&Value::Map(map)).map_err(ProtocolError::Encode)?;
    if body.len() > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge {
            len: body.len(),
            max: MAX_FRAME,
        });
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Checks a frame's announced length before anything is allocated for it.
pub fn check_len(header: [u8; 4]) -> Result<usize, ProtocolError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 {
        return Err(ProtocolError::EmptyFrame);
    }
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len)
}

/// Decodes a frame body: refuses a map that repeats a key (at any depth), checks the version,
/// then parses the message, refusing unknown fields and unknown message types.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    // A map that repeats a key is malformed: decoded leniently, the last one would win.
    let super::strict::StrictValue(value) =
        serde_cbor::from_slice(body).map_err(ProtocolError::Malformed)?;
    let Value::Map(mut map) = value else {
        return Err(ProtocolError::NotAMap {
            found: cbor_kind(&value),
        });
    };
    match map.remove(&Value::Text("v".into())) {
        Some(Value::Integer(v)) if v == VERSION as i128 => {}
        Some(Value::Integer(v)) => return Err(ProtocolError::Version { got: v.to_string() }),
        Some(other) => {
            return Err(ProtocolError::Version {
                got: format!("{other:?}"),
            })
        }
        None => return Err(ProtocolError::Version { got: "none".into() }),
    }
    serde_cbor::value::from_value(Value::Map(map)).map_err(ProtocolError::Invalid)
}

/// The CBOR type of `v`, for "not a map" messages.
fn cbor_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Bytes(_) => "a byte string",
        Value::Text(_) => "a text string",
        Value::Array(_) => "an array",
        Value::Map(_) => "a map",
        Value::Tag(..) => "a tagged value",
        _ => "an unknown value",
    }
}

/// Writes one frame to a blocking stream.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), ProtocolError> {
    let bytes = encode(msg)?;
    w.write_all(&bytes).map_err(ProtocolError::Io)
}

/// Reads one frame from a blocking stream, waiting at most `timeout` in total (`None`: wait
/// for ever for the first byte, then [`READ_DEADLINE`] for the rest). `Ok(None)` is a clean
/// end of stream before any byte of a frame.
pub fn read_frame<S, T>(
    stream: &mut S,
    timeout: Option<Duration>,
) -> Result<Option<T>, ProtocolError>
where
    S: Read + AsFd,
    T: DeserializeOwned,
{
    let mut header = [0u8; 4];
    let first_deadline = timeout.map(|t| Instant::now() + t);
    match read_exact_until(stream, &mut header, first_deadline, true)? {
        ReadOutcome::Eof => return Ok(None),
        ReadOutcome::Done => {}
    }
    let len = check_len(header)?;
    let mut body = vec![0u8; len];
    let deadline = Instant::now() + timeout.unwrap_or(READ_DEADLINE).min(READ_DEADLINE);
    match read_exact_until(stream, &mut body, Some(deadline), false)? {
        ReadOutcome::Eof => Err(ProtocolError::Truncated),
        ReadOutcome::Done => decode(&body).map(Some),
    }
}

enum ReadOutcome {
    Done,
    Eof,
}

fn read_exact_until<S: Read + AsFd>(
    stream: &mut S,
    buf: &mut [u8],
    deadline: Option<Instant>,
    eof_ok_at_start: bool,
) -> Result<ReadOutcome, ProtocolError> {
    let mut got = 0;
    while got < buf.len() {
        if let Some(deadline) = deadline {
            let now = Instant::now();
            if now >= deadline {
                return Err(if got == 0 && eof_ok_at_start {
                    ProtocolError::TimedOut
                } else {
                    ProtocolError::Truncated
                });
            }
            wait_readable(stream.as_fd(), deadline - now)?;
        }
        match stream.read(&mut buf[got..]) {
            Ok(0) if got == 0 && eof_ok_at_start => return Ok(ReadOutcome::Eof),
            Ok(0) => return Err(ProtocolError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    Ok(ReadOutcome::Done)
}

/// Waits until `fd` is readable or `timeout` passes (then `TimedOut`).
pub fn wait_readable(
    fd: std::os::fd::BorrowedFd<'_>,
    timeout: Duration,
) -> Result<(), ProtocolError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    loop {
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) => return Err(ProtocolError::TimedOut),
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ProtocolError::Io(e.into())),
        }
    }
}

/// Incremental frame reader for non-blocking sockets (the zygote's mio loop). Feed it
/// whenever the socket is readable; it reads exactly the bytes of one frame.
#[derive(Debug, Default)]
pub struct FrameReader {
    header: [u8; 4],
    header_got: usize,
    body: Option<Vec<u8>>,
    body_got: usize,
    started: Option<Instant>,
}

/// What a [`FrameReader`] produced.
#[derive(Debug)]
pub enum ReadEvent {
    /// A whole frame body (not yet decoded).
    Frame(Vec<u8>),
    /// The socket has no more bytes now.
    WouldBlock,
    /// The peer closed cleanly between frames.
    Eof,
}

impl FrameReader {
    /// When the frame now being read started, if one is.
    pub fn started(&self) -> Option<Instant> {
        self.started
    }

    /// Reads as much of the current frame as is available.
    pub fn read<R: Read>(&mut self, r: &mut R) -> Result<ReadEvent, ProtocolError> {
        loop {
            if self.body.is_none() {
                match r.read(&mut self.header[self.header_got..]) {
                    Ok(0) if self.header_got == 0 => return Ok(ReadEvent::Eof),
                    Ok(0) => return Err(ProtocolError::Truncated),
                    Ok(n) => {
                        if self.header_got == 0 {
                            self.started = Some(Instant::now());
                        }
                        self.header_got += n;
                        if self.header_got == 4 {
                            let len = check_len(self.header)?;
                            self.body = Some(vec![0u8; len]);
                            self.body_got = 0;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(ReadEvent::WouldBlock)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ProtocolError::Io(e)),
                }
            } else {
                let body = self.body.as_mut().expect("checked above");
                match r.read(&mut body[self.body_got..]) {
                    Ok(0) => return Err(ProtocolError::Truncated),
                    Ok(n) => {
                        self.body_got += n;
                        if self.body_got == body.len() {
                            let done = self.body.take().expect("checked above");
                            self.header_got = 0;
                            self.started = None;
                            return Ok(ReadEvent::Frame(done));
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Ok(ReadEvent::WouldBlock)
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ProtocolError::Io(e)),
                }
            }
        }
    }
}

/// The error code a reader's failure maps to on the wire.
pub fn error_code(e: &ProtocolError) -> ErrorCode {
    match e {
        ProtocolError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
        ProtocolError::Truncated => ErrorCode::Truncated,
        ProtocolError::TimedOut => ErrorCode::ReadTimeout,
        ProtocolError::Malformed(_) | ProtocolError::EmptyFrame | ProtocolError::NotAMap { .. } => {
            ErrorCode::BadCbor
        }
        ProtocolError::Version { .. } => ErrorCode::BadVersion,
        ProtocolError::Invalid(_) => ErrorCode::BadRequest,
        ProtocolError::Io(_) | ProtocolError::Encode(_) | ProtocolError::EncodeNotAMap => {
            ErrorCode::Internal
        }
        ProtocolError::Remote { code, .. } => *code,
        ProtocolError::Unexpected { .. } => ErrorCode::BadRequest,
        ProtocolError::FdCount { .. } => ErrorCode::BadFdCount,
    }
}

/// A map with one entry, for tests and hand-made frames.
pub fn raw_map(entries: &[(&str, Value)]) -> Value {
    let mut map = BTreeMap::new();
    for (k, v) in entries {
        map.insert(Value::Text((*k).into()), v.clone());
    }
    Value::Map(map)
}

#[cfg(test)]
mod tests {
    use super::super::{Request, WorkerId};
    use super::*;

    #[test]
    fn a_request_round_trips() {
        let req = Request::Spawn {
            id: 7,
            entry: "app".into(),
            worker: WorkerId(3),
            args: vec!["--x".into()],
            listeners: 1,
            device: None,
            spare: false,
        };
        let bytes = encode(&req).unwrap();
        let len = check_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, bytes.len() - 4);
        let back: Request = decode(&bytes[4..]).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn a_spare_spawn_and_activate_are_on_the_wire_as_the_protocol_shows_them() {
        use super::super::ParentMessage;
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let activate = encode(&ParentMessage::Activate {
            worker: WorkerId(0),
        })
        .unwrap();
        assert_eq!(
            hex(&activate),
            "0000001aa3617601647479706568616374697661746566776f726b657200"
        );
        let spawn = |spare| Request::Spawn {
            id: 1,
            entry: "app".into(),
            worker: WorkerId(1000),
            args: vec![],
            listeners: 1,
            device: Some(0),
            spare,
        };
        let plain = encode(&spawn(false)).unwrap();
        assert!(
            !hex(&plain).contains(&hex(b"spare")),
            "no `spare` key unless it is true: older zygotes refuse unknown fields"
        );
        let bytes = encode(&spawn(true)).unwrap();
        assert!(hex(&bytes).contains(&(hex(b"\x65spare") + "f5")));
        let back: Request = decode(&bytes[4..]).unwrap();
        assert_eq!(back, spawn(true));
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        let err = check_len(((MAX_FRAME + 1) as u32).to_be_bytes()).unwrap_err();
        assert!(matches!(err, ProtocolError::FrameTooLarge { .. }));
        assert!(matches!(
            check_len([0, 0, 0, 0]),
            Err(ProtocolError::EmptyFrame)
        ));
    }

    #[test]
    fn wrong_versions_and_unknown_fields_are_refused() {
        let v2 = raw_map(&[
            ("v", Value::Integer(2)),
            ("type", Value::Text("status".into())),
            ("id", Value::Integer(1)),
        ]);
        let body = serde_cbor::to_vec(&v2).unwrap();
        assert!(matches!(
            decode::<Request>(&body),
            Err(ProtocolError::Version { .. })
        ));
        let extra = raw_map(&[
            ("v", Value::Integer(1)),
            ("type", Value::Text("status".into())),
            ("id", Value::Integer(1)),
            ("path", Value::Text("/bin/sh".into())),
        ]);
        let body = serde_cbor::to_vec(&extra).unwrap();
        assert!(
            matches!(decode::<Request>(&body), Err(ProtocolError::Invalid(_))),
            "{:?}",
            decode::<Request>(&body)
        );
        let unknown = raw_map(&[
            ("v", Value::Integer(1)),
            ("type", Value::Text("exec".into())),
            ("id", Value::Integer(1)),
        ]);
        let body = serde_cbor::to_vec(&unknown).unwrap();
        assert!(matches!(
            decode::<Request>(&body),
            Err(ProtocolError::Invalid(_))
        ));
        assert!(matches!(
            decode::<Request>(&[0xff, 0x00]),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            decode::<Request>(&serde_cbor::to_vec(&Value::Integer(5)).unwrap()),
            Err(ProtocolError::NotAMap {
                found: "an integer"
            })
        ));
    }

    #[test]
    fn the_incremental_reader_takes_exactly_one_frame() {
        let a = encode(&Request::Status { id: 1 }).unwrap();
        let b = encode(&Request::Status { id: 2 }).unwrap();
        let mut all = a.clone();
        all.extend_from_slice(&b);
        let mut cursor = std::io::Cursor::new(all);
        let mut reader = FrameReader::default();
        let ReadEvent::Frame(body) = reader.read(&mut cursor).unwrap() else {
            panic!()
        };
        assert_eq!(decode::<Request>(&body).unwrap(), Request::Status { id: 1 });
        assert_eq!(cursor.position() as usize, a.len());
        let ReadEvent::Frame(body) = reader.read(&mut cursor).unwrap() else {
            panic!()
        };
        assert_eq!(decode::<Request>(&body).unwrap(), Request::Status { id: 2 });
        assert!(matches!(reader.read(&mut cursor).unwrap(), ReadEvent::Eof));
    }
}
