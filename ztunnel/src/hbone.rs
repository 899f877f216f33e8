//! HBONE: TCP tunnelled through HTTP/2 CONNECT streams, wire-compatible with Istio's
//! ztunnel (see `HBONE.md`).
//!
//! This module owns the HTTP/2 layer only and works over any byte stream; TLS (and the
//! identity checks that go with it) is layered underneath by the caller.
//!
//! - [`request`]: the CONNECT request (authority, `forwarded`, `baggage`, `traceparent`),
//!   built by the client and parsed by the server.
//! - [`server`]: serves the CONNECT streams of one inbound connection (port 15008).
//! - [`pool`]: outbound HTTP/2 connections, shared by streams with the same key.
//! - [`stream`]: [`H2Stream`], one tunnel as `AsyncRead + AsyncWrite`.
//! - [`copy`]: moves bytes between a tunnel and a plain socket.

pub mod copy;
pub mod keepalive;
pub mod pool;
pub mod request;
pub mod server;
pub mod stream;
#[cfg(test)]
mod test_wire;

use std::time::Duration;

pub use copy::{Transferred, copy_bidirectional};
pub use pool::{Pool, PoolSettings, PoolStats};
pub use request::{Baggage, ConnectRequest, Rejection, Target, TargetAddr, parse_connect};
pub use server::{Accepted, ServerSettings, serve};
pub use stream::H2Stream;

const KIB: u32 = 1024;
const MIB: u32 = 1024 * KIB;

/// `SETTINGS_INITIAL_WINDOW_SIZE`, both sides.
pub const INITIAL_STREAM_WINDOW: u32 = 4 * MIB;
/// Connection-level receive window, announced with a WINDOW_UPDATE on stream 0.
pub const CONNECTION_WINDOW: u32 = 16 * MIB;
/// `SETTINGS_MAX_FRAME_SIZE`, both sides.
pub const MAX_FRAME_SIZE: u32 = MIB;
/// `SETTINGS_MAX_HEADER_LIST_SIZE` announced by the client.
pub const CLIENT_MAX_HEADER_LIST_SIZE: u32 = 16 * KIB;
/// `SETTINGS_MAX_HEADER_LIST_SIZE` announced by the server.
pub const SERVER_MAX_HEADER_LIST_SIZE: u32 = 64 * KIB;
/// `SETTINGS_MAX_CONCURRENT_STREAMS` announced by the server.
pub const SERVER_MAX_CONCURRENT_STREAMS: u32 = 200;
/// Both sides send a PING this often.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// A PING not answered within this long means the peer is gone.
pub const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// The server's wait for the client's HTTP/2 preface (`--h2-accept-timeout`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A whole pool dial: connector and HTTP/2 handshake (`--hbone-dial-timeout`).
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(30);
/// From sending a CONNECT to its response headers (`--connect-response-timeout`).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(15);
