//! Raw HTTP/2 frames for the client and server tests that check what goes on the wire.
use tokio::io::{AsyncRead, AsyncReadExt as _};

/// Reads one frame: (type, flags, stream id, payload).
pub(crate) async fn read_frame<R: AsyncRead + Unpin>(io: &mut R) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    io.read_exact(&mut head).await.expect("frame header");
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    io.read_exact(&mut payload).await.expect("frame payload");
    (head[3], head[4], stream, payload)
}

/// The (identifier, value) pairs of a SETTINGS payload (RFC 9113 §6.5.1).
pub(crate) fn settings(payload: &[u8]) -> Vec<(u16, u32)> {
    payload
        .chunks_exact(6)
        .map(|p| {
            (
                u16::from_be_bytes([p[0], p[1]]),
                u32::from_be_bytes([p[2], p[3], p[4], p[5]]),
            )
        })
        .collect()
}

/// The increment of a WINDOW_UPDATE payload (RFC 9113 §6.9).
pub(crate) fn window_increment(payload: &[u8]) -> u32 {
    u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff
}
