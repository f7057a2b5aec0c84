//! A lean HTTP/2 server connection for the proxy's clients, in place of hyper's: buffers that
//! start empty, grow only while a frame needs them and are released when idle, no task or
//! channel per stream, and requests handed to the same tower service (the tonic routes).
//!
//! hyper's connection (h2 0.4) holds a 16 KiB frame write buffer, an 8 KiB read buffer and a
//! 4 KiB HPACK buffer per connection whatever its traffic, none of them settable through hyper or
//! tonic (docs/benchmarks.md, "One TLS connection with one watch each"); with thousands of idle
//! watching agents those fixed buffers are most of the proxy's memory. This connection reads from
//! the TLS stream into the stack and keeps on the heap only an incomplete frame, and queues its
//! output in one buffer written out and released at once.
//!
//! What it does (RFC 9113): preface and SETTINGS, PING (and keepalive pings of its own),
//! flow control both ways (a stream's body is taken from the service only while the client's
//! windows let it through, so a slow reader leaves its backlog in the service, where the watch
//! backlog bound cuts it off), HEADERS with CONTINUATION (HPACK-decoded by `loona-hpack`), DATA,
//! trailers, RST_STREAM and GOAWAY both ways. A service may hand work to the connection
//! ([`ConnTasks`], an extension of every request) to be polled on the connection's task. Responses are encoded as HPACK literals without
//! indexing: no encoder table is kept. Frames larger than 16 KiB are refused (FRAME_SIZE_ERROR),
//! and none larger is written.
mod body;
mod conn;
mod frame;
mod header;
mod stream;
mod tasks;

#[cfg(test)]
mod tests;

pub use conn::{Conn, Timing};
pub use tasks::ConnTasks;
