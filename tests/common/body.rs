//! Bodies the fakes and clients send: fixed frame lists (data + trailers) and generated streams
//! of any length that never exist in memory whole.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type AnyBody = BoxBody<Bytes, BoxError>;

/// Data frames, then optional trailers, each handed out as its own frame.
#[derive(Debug, Default)]
pub struct Frames {
    frames: VecDeque<Frame<Bytes>>,
}

impl Frames {
    pub fn new() -> Frames {
        Frames::default()
    }

    pub fn data(mut self, data: impl Into<Bytes>) -> Frames {
        self.frames.push_back(Frame::data(data.into()));
        self
    }

    pub fn trailers(mut self, trailers: HeaderMap) -> Frames {
        self.frames.push_back(Frame::trailers(trailers));
        self
    }

    pub fn boxed_any(self) -> AnyBody {
        self.map_err(|e: Infallible| match e {}).boxed()
    }
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.frames.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
    }
}

/// `len` bytes of a repeating pattern, in `chunk`-sized frames, generated as they are polled.
/// With `exact_size`, the length is announced (`Content-Length`); otherwise the sender has to
/// use chunked encoding.
#[derive(Debug)]
pub struct Generated {
    remaining: u64,
    chunk: Bytes,
    exact_size: bool,
    /// Bytes handed out so far, for a sender that wants to see backpressure.
    produced: Option<Arc<AtomicU64>>,
    /// After this many bytes the body fails instead of continuing (a sender that dies).
    fail_after: Option<u64>,
}

impl Generated {
    pub fn new(len: u64, chunk_size: usize, exact_size: bool) -> Generated {
        let chunk: Vec<u8> = (0..chunk_size).map(|i| (i % 251) as u8).collect();
        Generated {
            remaining: len,
            chunk: Bytes::from(chunk),
            exact_size,
            produced: None,
            fail_after: None,
        }
    }

    /// Counts every byte handed out into `counter`.
    pub fn counted(mut self, counter: Arc<AtomicU64>) -> Generated {
        self.produced = Some(counter);
        self
    }

    /// Fails with an error once `bytes` have been handed out.
    pub fn failing_after(mut self, bytes: u64) -> Generated {
        self.fail_after = Some(bytes);
        self
    }

    pub fn boxed_any(self) -> AnyBody {
        self.boxed()
    }
}

impl Body for Generated {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.fail_after == Some(0) {
            return Poll::Ready(Some(Err("the sender died mid-body".into())));
        }
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let mut n = self.remaining.min(self.chunk.len() as u64);
        if let Some(left) = self.fail_after {
            n = n.min(left);
            self.fail_after = Some(left - n);
        }
        self.remaining -= n;
        if let Some(c) = &self.produced {
            c.fetch_add(n, Ordering::SeqCst);
        }
        // A slice of a shared buffer: no allocation or copy per frame.
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n as usize)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.exact_size {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}

pub fn full(data: impl Into<Bytes>) -> AnyBody {
    http_body_util::Full::new(data.into())
        .map_err(|e: Infallible| match e {})
        .boxed()
}

pub fn empty() -> AnyBody {
    http_body_util::Empty::new().map_err(|e: Infallible| match e {}).boxed()
}
