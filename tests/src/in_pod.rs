//! A TCP server the test plays itself inside a pod (a fake HBONE peer, a fake waypoint):
//! bound in the pod's netns, served from a thread of its own until dropped.
use std::{future::Future, net::SocketAddr};

use ztunnel::netns::Netns;

use crate::Pod;

/// Stops the server (and every connection task it spawned) when dropped.
pub struct InPodServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for InPodServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Listens on `addr` in `pod`'s netns and hands each accepted connection to `serve`, on a
/// task of the server's own runtime.
pub fn serve<F, Fut>(pod: &Pod, addr: SocketAddr, serve: F) -> anyhow::Result<InPodServer>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let ns = Netns::open(&pod.netns_path)?;
    let listener = ns.run(&Netns::current()?, || std::net::TcpListener::bind(addr))??;
    listener.set_nonblocking(true)?;
    let (stop, mut stopped) = tokio::sync::oneshot::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the in-pod server");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    accepted = listener.accept() => if let Ok((tcp, _)) = accepted {
                        // Tasks die with the runtime when the server is dropped.
                        tokio::spawn(serve(tcp));
                    },
                }
            }
        });
    });
    Ok(InPodServer {
        stop: Some(stop),
        thread: Some(thread),
    })
}
