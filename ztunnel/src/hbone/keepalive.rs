//! HTTP/2 PING keepalive shared by the server and the pool: a connection whose peer stops
//! answering is declared dead instead of holding streams open forever.

use std::time::Duration;

use h2::{Ping, PingPong};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("hbone peer did not answer a ping within {timeout:?}")]
    Timeout { timeout: Duration },
    #[error("failed to ping hbone peer")]
    Ping {
        #[source]
        source: h2::Error,
    },
}

/// Pings the peer every `interval` and resolves with the reason once the peer is
/// considered dead. Never resolves while the peer answers.
///
/// Only makes progress while the h2 connection itself is being polled, since that is
/// what reads the PONG off the wire.
pub(crate) async fn run(
    ping_pong: Option<PingPong>,
    interval: Duration,
    timeout: Duration,
) -> Error {
    // h2 hands the PingPong out once per connection; without it there is nothing to do.
    let Some(mut ping_pong) = ping_pong else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, ping_pong.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(source)) => return Error::Ping { source },
            Err(_elapsed) => return Error::Timeout { timeout },
        }
    }
}
