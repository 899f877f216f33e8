//! Raw HTTP/2 frames for the client and server tests that check what goes on the wire.
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt as _};

use super::stream::H2Stream;

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

/// A client and a server stream over an in-memory connection, both already past the
/// CONNECT/200 exchange, over a pipe of `capacity` bytes each way. The returned task
/// handles drive the two connections.
pub(crate) async fn stream_pair(
    capacity: usize,
) -> (H2Stream, H2Stream, Vec<tokio::task::JoinHandle<()>>) {
    let (a, b) = tokio::io::duplex(capacity);
    let server = tokio::spawn(async move {
        let mut conn = h2::server::handshake(b).await.expect("server handshake");
        let (req, mut respond) = conn
            .accept()
            .await
            .expect("a stream")
            .expect("stream accepted");
        let send = respond
            .send_response(Response::new(()), false)
            .expect("response sent");
        let stream = H2Stream::new(send, req.into_body());
        let driver = tokio::spawn(async move { while conn.accept().await.is_some() {} });
        (stream, driver)
    });
    let (mut client, conn) = h2::client::handshake(a).await.expect("client handshake");
    let client_driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::new(());
    *req.method_mut() = Method::CONNECT;
    *req.uri_mut() = "10.0.0.1:80".parse().expect("uri");
    let (resp, send) = client.send_request(req, false).expect("request sent");
    let resp = resp.await.expect("response");
    assert_eq!(resp.status(), StatusCode::OK);
    let client_stream = H2Stream::new(send, resp.into_body());
    let (server_stream, server_driver) = server.await.expect("server task");
    (
        client_stream,
        server_stream,
        vec![client_driver, server_driver],
    )
}
