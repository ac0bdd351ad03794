//! What the network targets share: one tokio runtime for the whole fuzzing process, and a
//! loopback HTTP peer that answers every request with bytes the fuzzer chose.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Longest an exchange with a fake peer may take. A hang is libFuzzer's `-timeout`, which is
/// longer; this only keeps a stuck input from waiting for ever.
pub const CALL_LIMIT: Duration = Duration::from_secs(5);

/// The process's runtime: multi-threaded, so a server task runs while a target waits on it.
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// Runs `f` to its end (or [`CALL_LIMIT`]) on the shared runtime.
pub fn block_on<F: Future>(f: F) -> Option<F::Output> {
    runtime().block_on(async { tokio::time::timeout(CALL_LIMIT, f).await.ok() })
}

/// A loopback HTTP/1.1 peer: reads each request (head and `Content-Length` body), writes the
/// current answer's bytes as they are, and closes the connection.
pub struct RawPeer {
    pub addr: SocketAddr,
    answer: Arc<Mutex<Vec<u8>>>,
}

impl RawPeer {
    pub fn start() -> RawPeer {
        let answer = Arc::new(Mutex::new(Vec::new()));
        let listener = runtime()
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("a loopback port");
        let addr = listener.local_addr().expect("its address");
        let shared = answer.clone();
        runtime().spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let answer = shared.clone();
                tokio::spawn(async move {
                    if read_request(&mut stream).await.is_some() {
                        let bytes = answer.lock().unwrap_or_else(|e| e.into_inner()).clone();
                        let _ = stream.write_all(&bytes).await;
                    }
                    let _ = stream.shutdown().await;
                });
            }
        });
        RawPeer { addr, answer }
    }

    /// What every request gets from now on.
    pub fn answer(&self, bytes: &[u8]) {
        *self.answer.lock().unwrap_or_else(|e| e.into_inner()) = bytes.to_vec();
    }
}

/// Reads one request's head and its `Content-Length` body (what our clients send).
async fn read_request(stream: &mut tokio::net::TcpStream) -> Option<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            return None;
        }
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let mut have = buf.len() - head_end;
    while have < length {
        let n = stream.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        have += n;
    }
    Some(())
}
