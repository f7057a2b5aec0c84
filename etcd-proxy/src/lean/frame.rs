//! HTTP/2 frame layout (RFC 9113 §4, §6): the 9-byte header, the frame types and error codes the lean server uses, and writers that append frames to a buffer.
use bytes::Bytes;

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Bytes of a frame header.
pub const HEAD_LEN: usize = 9;

/// The largest frame payload this server accepts: the protocol's default,
/// which it never raises, so that no frame needs more than this much
/// buffered.
pub const MAX_FRAME: usize = 16_384;

/// The flow-control window every connection and stream starts with.
pub const DEFAULT_WINDOW: u32 = 65_535;

/// The largest flow-control window (2^31 - 1).
pub const MAX_WINDOW: i64 = (1 << 31) - 1;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const PRIORITY: u8 = 0x2;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PUSH_PROMISE: u8 = 0x5;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const PADDED: u8 = 0x8;
pub const PRIORITY_FLAG: u8 = 0x20;

pub const SETTINGS_ENABLE_PUSH: u16 = 0x2;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const SETTINGS_MAX_FRAME_SIZE: u16 = 0x5;
pub const SETTINGS_MAX_HEADER_LIST_SIZE: u16 = 0x6;

/// Error codes of RST_STREAM and GOAWAY (RFC 9113 §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Reason {
    NoError = 0x0,
    Protocol = 0x1,
    Internal = 0x2,
    FlowControl = 0x3,
    FrameSize = 0x6,
    RefusedStream = 0x7,
    Compression = 0x9,
    EnhanceYourCalm = 0xb,
}

/// A frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Head {
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

impl Head {
    /// Reads the header at the start of `b`, which holds at least
    /// [`HEAD_LEN`] bytes.
    pub fn parse(b: &[u8]) -> Head {
        Head {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// Appends a frame header.
pub fn put_head(out: &mut Vec<u8>, len: usize, kind: u8, flags: u8, stream: u32) {
    let l = (len as u32).to_be_bytes();
    out.extend_from_slice(&[l[1], l[2], l[3], kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// Appends a SETTINGS frame with these (identifier, value) pairs.
pub fn put_settings(out: &mut Vec<u8>, settings: &[(u16, u32)]) {
    put_head(out, settings.len() * 6, SETTINGS, 0, 0);
    for (id, v) in settings {
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&v.to_be_bytes());
    }
}

pub fn put_settings_ack(out: &mut Vec<u8>) {
    put_head(out, 0, SETTINGS, ACK, 0);
}

pub fn put_ping(out: &mut Vec<u8>, flags: u8, payload: [u8; 8]) {
    put_head(out, 8, PING, flags, 0);
    out.extend_from_slice(&payload);
}

pub fn put_window_update(out: &mut Vec<u8>, stream: u32, increment: u32) {
    put_head(out, 4, WINDOW_UPDATE, 0, stream);
    out.extend_from_slice(&increment.to_be_bytes());
}

pub fn put_rst(out: &mut Vec<u8>, stream: u32, reason: Reason) {
    put_head(out, 4, RST_STREAM, 0, stream);
    out.extend_from_slice(&(reason as u32).to_be_bytes());
}

pub fn put_goaway(out: &mut Vec<u8>, last_stream: u32, reason: Reason) {
    put_head(out, 8, GOAWAY, 0, 0);
    out.extend_from_slice(&last_stream.to_be_bytes());
    out.extend_from_slice(&(reason as u32).to_be_bytes());
}

pub fn put_data(out: &mut Vec<u8>, stream: u32, data: &[u8], end: bool) {
    put_head(
        out,
        data.len(),
        DATA,
        if end { END_STREAM } else { 0 },
        stream,
    );
    out.extend_from_slice(data);
}

/// Appends a header block as HEADERS and, past `max_frame` bytes,
/// CONTINUATION frames.
pub fn put_header_block(
    out: &mut Vec<u8>,
    stream: u32,
    block: &[u8],
    end_stream: bool,
    max_frame: usize,
) {
    let mut chunks = block.chunks(max_frame.max(1)).peekable();
    let mut kind = HEADERS;
    let mut flags = if end_stream { END_STREAM } else { 0 };
    if block.is_empty() {
        put_head(out, 0, kind, flags | END_HEADERS, stream);
        return;
    }
    while let Some(chunk) = chunks.next() {
        if chunks.peek().is_none() {
            flags |= END_HEADERS;
        }
        put_head(out, chunk.len(), kind, flags, stream);
        out.extend_from_slice(chunk);
        kind = CONTINUATION;
        flags = 0;
    }
}

/// The payload of a HEADERS or DATA frame without its padding (and, for
/// HEADERS, its priority fields); `None` when the padding is malformed.
pub fn unpad(head: &Head, payload: &[u8]) -> Option<Bytes> {
    let mut p = payload;
    let mut pad = 0;
    if head.flags & PADDED != 0 {
        pad = usize::from(*p.first()?);
        p = &p[1..];
    }
    if head.kind == HEADERS && head.flags & PRIORITY_FLAG != 0 {
        p = p.get(5..)?;
    }
    if pad > p.len() {
        return None;
    }
    Some(Bytes::copy_from_slice(&p[..p.len() - pad]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_roundtrip() {
        let mut b = Vec::new();
        put_head(&mut b, 0x01_02_03, HEADERS, END_HEADERS, 0x7fff_fffe);
        assert_eq!(
            Head::parse(&b),
            Head {
                len: 0x01_02_03,
                kind: HEADERS,
                flags: END_HEADERS,
                stream: 0x7fff_fffe
            }
        );
    }

    #[test]
    fn header_block_splits_into_continuations() {
        let mut b = Vec::new();
        put_header_block(&mut b, 3, &[7u8; 10], true, 4);
        let first = Head::parse(&b);
        assert_eq!(
            (first.kind, first.flags, first.len),
            (HEADERS, END_STREAM, 4)
        );
        let second = Head::parse(&b[13..]);
        assert_eq!(
            (second.kind, second.flags, second.len),
            (CONTINUATION, 0, 4)
        );
        let third = Head::parse(&b[26..]);
        assert_eq!(
            (third.kind, third.flags, third.len),
            (CONTINUATION, END_HEADERS, 2)
        );
        assert_eq!(b.len(), 3 * 9 + 10);
    }

    #[test]
    fn padding_is_stripped_and_checked() {
        let head = Head {
            len: 0,
            kind: DATA,
            flags: PADDED,
            stream: 1,
        };
        assert_eq!(unpad(&head, &[2, b'a', b'b', 0, 0]).unwrap(), &b"ab"[..]);
        assert!(unpad(&head, &[5, b'a']).is_none());
    }
}
