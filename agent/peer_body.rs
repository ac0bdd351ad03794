//! Bodies of answers from the agent's HTTP peers (the metadata server, Secret Manager,
//! cloudflared's `/ready`, etcd, the Kubernetes API server), read with a ceiling. A peer can be broken, or an address a
//! hostile party controls, and reqwest's `text()`/`bytes()`/`json()` read whatever arrives into
//! memory: a body without end would grow the agent until the kernel kills it. Each caller names
//! the largest answer its protocol can have; past that the answer is refused, not buffered.

use bytes::{Bytes, BytesMut};

/// Why a body was not read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{0}")]
    Read(String),
}

/// The whole body of `resp`, or [`BodyError::TooLarge`] as soon as it passes `limit` bytes (a
/// `Content-Length` over the limit is refused before anything is read).
pub async fn read(mut resp: reqwest::Response, limit: usize) -> Result<Bytes, BodyError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| BodyError::Read(crate::errors::error_chain(&e)))?
    {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// [`read`], as UTF-8 text (invalid sequences replaced, as reqwest's `text()` does).
pub async fn read_text(resp: reqwest::Response, limit: usize) -> Result<String, BodyError> {
    let body = read(resp, limit).await?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A loopback HTTP peer for tests of the clients that read through this module.
#[cfg(test)]
pub(crate) mod test_peer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A loopback peer that answers one request with `head`, then writes `body_len` bytes of
    /// body in 64 KiB pieces (or until the client goes away).
    pub(crate) async fn peer(head: &'static str, body_len: usize) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            s.write_all(head.as_bytes()).await.expect("head");
            let piece = vec![b'x'; 64 * 1024];
            let mut left = body_len;
            while left > 0 {
                let n = left.min(piece.len());
                if s.write_all(&piece[..n]).await.is_err() {
                    return;
                }
                left -= n;
            }
        });
        format!("http://{addr}/")
    }
}

#[cfg(test)]
mod tests {
    use super::test_peer::peer;
    use super::*;

    #[tokio::test]
    async fn a_body_without_end_is_refused_at_the_limit_not_buffered() {
        // No Content-Length: the body runs until the peer closes, here 64 MiB.
        let url = peer("HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n", 64 << 20).await;
        let resp = reqwest::get(&url).await.expect("an answer");
        let e = read(resp, 1 << 20).await.expect_err("over the limit");
        assert!(matches!(e, BodyError::TooLarge { limit } if limit == 1 << 20), "{e}");
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_before_reading() {
        let url = peer("HTTP/1.1 200 OK\r\ncontent-length: 10485760\r\n\r\n", 0).await;
        let resp = reqwest::get(&url).await.expect("an answer");
        assert!(matches!(read(resp, 1024).await, Err(BodyError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let url = peer("HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n", 1000).await;
        let resp = reqwest::get(&url).await.expect("an answer");
        assert_eq!(read_text(resp, 1000).await.expect("read").len(), 1000);
    }
}
