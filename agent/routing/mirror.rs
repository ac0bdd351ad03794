//! `RequestMirror`: a fire-and-forget copy of a request to another backend.
//!
//! The real request is never delayed or failed by a mirror. Its body streams upstream as
//! usual while a [`MirrorTee`] keeps a copy of the chunks (cheap `Bytes` clones); once the
//! body has been read to its end, the copy goes to the mirror task, which sends it on its own
//! connection pool. Two bounds keep memory finite:
//! - a body larger than [`MIRROR_BODY_CAP`] is not mirrored (the copy is dropped as soon as it
//!   would exceed the cap; a truncated copy is never sent);
//! - at most [`MIRROR_MAX_IN_FLIGHT`] copies are buffered or in flight; beyond that, new
//!   copies are skipped and logged at debug level.
//!
//! So mirroring holds at most `MIRROR_BODY_CAP × MIRROR_MAX_IN_FLIGHT` (16 MiB) of bodies.

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

/// Largest request body that is mirrored.
pub const MIRROR_BODY_CAP: usize = 256 * 1024;

/// Mirrored requests buffered or in flight at once, across the whole proxy.
pub const MIRROR_MAX_IN_FLIGHT: usize = 64;

/// Copies a request body, as it streams, for the mirror tasks waiting on it.
#[derive(Debug, Default)]
pub struct MirrorTee {
    chunks: Vec<Bytes>,
    len: usize,
    waiting: Vec<oneshot::Sender<Bytes>>,
}

impl MirrorTee {
    /// A tee feeding each of `waiting` the complete body.
    pub fn new(waiting: Vec<oneshot::Sender<Bytes>>) -> MirrorTee {
        MirrorTee {
            chunks: Vec::new(),
            len: 0,
            waiting,
        }
    }

    /// Keeps a copy of `data`. `false` when the body outgrew the cap: drop the tee, and with it
    /// the mirror tasks' senders, so they give up.
    pub fn observe(&mut self, data: &Bytes) -> bool {
        self.len += data.len();
        if self.len > MIRROR_BODY_CAP {
            return false;
        }
        if !data.is_empty() {
            self.chunks.push(data.clone());
        }
        true
    }

    /// The body ended: hand the copy to every mirror task.
    pub fn finish(self) {
        let body = match self.chunks.as_slice() {
            [] => Bytes::new(),
            [one] => one.clone(),
            many => {
                let mut buf = BytesMut::with_capacity(self.len);
                for c in many {
                    buf.extend_from_slice(c);
                }
                buf.freeze()
            }
        };
        for tx in self.waiting {
            let _ = tx.send(body.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tee_delivers_the_whole_body_or_nothing() {
        let (tx, mut rx) = oneshot::channel();
        let mut tee = MirrorTee::new(vec![tx]);
        assert!(tee.observe(&Bytes::from_static(b"ab")));
        assert!(tee.observe(&Bytes::from_static(b"cd")));
        tee.finish();
        assert_eq!(rx.try_recv().unwrap(), "abcd");

        let (tx, mut rx) = oneshot::channel();
        let mut tee = MirrorTee::new(vec![tx]);
        assert!(tee.observe(&Bytes::from(vec![0u8; MIRROR_BODY_CAP])));
        assert!(!tee.observe(&Bytes::from_static(b"x")), "one byte over the cap");
        drop(tee);
        assert!(rx.try_recv().is_err(), "an oversized body is not mirrored");
    }
}
