//! The request body as it goes upstream: the size limit enforced as it streams, the body read
//! timeout once the response has started, the access log's byte count, and the copy kept for
//! mirrors.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::access_log::Exchange;
use super::limits::{Activity, BodyReadTimeout, BodyTimer};
use crate::routing::mirror::MirrorTee;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The request body passed upstream, with the configured size limit enforced as it streams
/// (a chunked body has no `Content-Length` to check up front), and a copy kept for mirrors.
pub struct CappedBody {
    inner: Incoming,
    remaining: u64,
    progress: Arc<Activity>,
    /// `proxy.body_read_timeout`; `timer` enforces it once the response has started.
    body_timeout: Duration,
    timer: BodyTimer,
    tee: Option<MirrorTee>,
    /// The access log's tally of bytes in; `None` when the log is off.
    exchange: Option<Arc<Exchange>>,
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the configured limit")]
pub struct BodyTooLarge;

impl Body for CappedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(frame) => frame,
            Poll::Pending => return self.poll_waiting(cx),
        };
        self.progress.set_waiting_for_client(false);
        Poll::Ready(match frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > self.remaining {
                        self.tee = None;
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    self.remaining -= n;
                    self.progress.touch();
                    if let Some(x) = &self.exchange {
                        x.sent(n);
                    }
                    if let Some(tee) = &mut self.tee {
                        if !tee.observe(data) {
                            self.tee = None;
                        }
                    }
                }
                // hyper may stop polling once `is_end_stream` says so, without a final `None`.
                if self.inner.is_end_stream() {
                    self.progress.set_body_done();
                    if let Some(tee) = self.tee.take() {
                        tee.finish();
                    }
                }
                Some(Ok(frame))
            }
            Some(Err(e)) => {
                self.tee = None;
                self.progress.set_body_done();
                Some(Err(Box::new(e)))
            }
            None => {
                self.progress.set_body_done();
                if let Some(tee) = self.tee.take() {
                    tee.finish();
                }
                None
            }
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl CappedBody {
    /// `inner` with at most `limit` bytes, the body read timeout `body_timeout` (counted on
    /// `progress`), a mirror tee and the access log's tally when there are ones.
    pub(super) fn new(
        inner: Incoming,
        limit: u64,
        progress: Arc<Activity>,
        body_timeout: Duration,
        tee: Option<MirrorTee>,
        exchange: Option<Arc<Exchange>>,
    ) -> CappedBody {
        CappedBody {
            inner,
            remaining: limit,
            progress,
            body_timeout,
            timer: BodyTimer::default(),
            tee,
            exchange,
        }
    }

    /// The client has not sent the next body bytes yet. Before the response head,
    /// [`super::upstream::response_head`]'s timer watches for a stall; after it, this body's own.
    fn poll_waiting(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.progress.set_waiting_for_client(true);
        if self.progress.response_started() && self.timer.expired(cx, &self.progress, self.body_timeout) {
            self.tee = None;
            self.progress.set_body_done();
            return Poll::Ready(Some(Err(Box::new(BodyReadTimeout(self.body_timeout)))));
        }
        Poll::Pending
    }
}
