//! Connection hygiene of the Export listener: at most `max` connections at once (the rest wait
//! in the kernel's listen backlog), so that a flood of idle connections cannot take every file
//! descriptor from health, the store and the manifest reader; accept errors that mean "out of
//! descriptors" slow the loop down instead of spinning it. Together with the TLS handshake
//! timeout, a connection that never completes mTLS holds its slot for a few seconds only.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// An accepted connection holding one of the listener's slots until it is closed.
pub struct Limited {
    inner: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for Limited {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for Limited {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// "Too many open files" for the process (EMFILE) or the system (ENFILE).
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// The listener's connections, at most `max` open at once.
pub fn incoming(
    listener: TcpListener,
    max: usize,
) -> impl Stream<Item = io::Result<Limited>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    futures::stream::unfold((listener, slots), |(listener, slots)| async move {
        // Waits while every slot is taken: new connections queue in the backlog.
        let slot = Arc::clone(&slots).acquire_owned().await.ok()?;
        let accepted = match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                Ok(Limited {
                    inner: stream,
                    _slot: slot,
                })
            }
            Err(e) => {
                if out_of_descriptors(&e) {
                    tracing::warn!(error = %e, "accepting an Export connection failed; retrying in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e)
            }
        };
        Some((accepted, (listener, slots)))
    })
}
