//! Bodies stream through the proxy in both directions: a 1 GiB upload and a large download
//! leave the agent's peak resident memory (VmHWM) where it was.
//!
//! The numbers are printed; see them with `cargo test --test streaming -- --nocapture`.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::body::Generated;
use common::client::{self, chain};
use common::{eventually, AgentBuilder, ConfigText, FakeUpstream, Wire, DEADLINE};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
/// Peak RSS the agent may reach while streaming. A buffered 1 GiB body would blow far past it.
const HWM_LIMIT_KIB: u64 = 64 * 1024;

fn streaming_config(up: &FakeUpstream) -> ConfigText {
    // Default timeouts: an upload that keeps moving never counts against upstream_timeout.
    ConfigText::new().host("bulk.test", &up.url())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_gib_upload_streams_without_growing_memory() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new().start(&streaming_config(&up)).await;
    let before = agent.memory();

    let started = tokio::time::Instant::now();
    let req = client::request(Method::POST, "bulk.test", "/sink")
        .header("content-type", "application/octet-stream")
        .body(Generated::new(GIB, 256 * 1024, true).boxed_any())
        .expect("request");
    let addr = agent.proxy_addr();
    let upload = tokio::spawn(async move { client::try_send(addr, req).await });

    // Sample while the body is in flight: the upstream must see bytes arrive before the
    // client has sent them all (streaming, not store-and-forward).
    let mut peak_rss = before.rss_kib;
    let mut seen_midway = false;
    while !upload.is_finished() {
        let m = agent.memory();
        peak_rss = peak_rss.max(m.rss_kib);
        let got = up.sink_bytes();
        if got > 0 && got < GIB {
            seen_midway = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let reply = upload.await.expect("upload task").expect("upload completed");
    let elapsed = started.elapsed();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["bytes"], GIB);
    assert_eq!(up.sink_bytes(), GIB);
    assert!(
        seen_midway,
        "the upstream never saw a partial body: the proxy buffered it"
    );

    let after = agent.memory();
    eprintln!(
        "1 GiB upload: {:.1} s ({:.0} MiB/s); agent VmRSS before {} KiB, peak sampled {} KiB; VmHWM before {} KiB, after {} KiB",
        elapsed.as_secs_f64(),
        GIB as f64 / MIB as f64 / elapsed.as_secs_f64(),
        before.rss_kib,
        peak_rss,
        before.hwm_kib,
        after.hwm_kib
    );
    assert!(
        after.hwm_kib < HWM_LIMIT_KIB,
        "agent peak RSS {} KiB during a 1 GiB upload (limit {HWM_LIMIT_KIB} KiB)",
        after.hwm_kib
    );
}

/// Downloads `path` over a fresh connection, counting body bytes as they stream in.
async fn download(addr: std::net::SocketAddr, path: &str) -> (StatusCode, Option<String>, u64) {
    let (status, length, total, error) = try_download(addr, path).await;
    if let Some(e) = error {
        panic!("download body failed after {total} bytes: {e}");
    }
    (status, length, total)
}

/// Like [`download`], but a body error is returned (with the bytes that arrived before it).
async fn try_download(addr: std::net::SocketAddr, path: &str) -> (StatusCode, Option<String>, u64, Option<String>) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let req = client::request(Method::GET, "bulk.test", path)
        .body(common::body::empty())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response head");
    let status = resp.status();
    let length = resp
        .headers()
        .get("content-length")
        .map(|v| v.to_str().unwrap_or("").to_owned());
    let mut body = resp.into_body();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => total += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => return (status, length, total, Some(chain(&e))),
        }
    }
    (status, length, total, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_download_streams_without_growing_memory() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new().start(&streaming_config(&up)).await;
    let addr = agent.proxy_addr();
    let size = 256 * MIB;

    let started = tokio::time::Instant::now();
    let (status, length, total) =
        tokio::time::timeout(DEADLINE * 6, download(addr, &format!("/download?bytes={size}")))
            .await
            .expect("download finished in time");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        length.as_deref(),
        Some(size.to_string().as_str()),
        "Content-Length passed on"
    );
    assert_eq!(total, size);

    let (status, length, total) = download(addr, &format!("/download?bytes={}&chunked", 64 * MIB)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(length, None, "a chunked body stays chunked");
    assert_eq!(total, 64 * MIB);

    let m = agent.memory();
    eprintln!(
        "320 MiB download: {:.1} s; agent VmRSS {} KiB, VmHWM {} KiB",
        started.elapsed().as_secs_f64(),
        m.rss_kib,
        m.hwm_kib
    );
    assert!(
        m.hwm_kib < HWM_LIMIT_KIB,
        "agent peak RSS {} KiB during downloads (limit {HWM_LIMIT_KIB} KiB)",
        m.hwm_kib
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_holds_the_upstream_back() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new().start(&streaming_config(&up)).await;
    let size = 256 * MIB;
    let mut conn = TcpStream::connect(agent.proxy_addr()).await.expect("connect");
    conn.write_all(format!("GET /download?bytes={size} HTTP/1.1\r\nHost: bulk.test\r\n\r\n").as_bytes())
        .await
        .expect("write");
    eventually(DEADLINE, "the download to start", || async {
        (up.stats.download_bytes.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    // The client reads nothing. Give an unbounded buffer in the agent time to show itself:
    // the generator runs at hundreds of MiB/s when nothing holds it back.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let produced = up.stats.download_bytes.load(Ordering::SeqCst);
    let m = agent.memory();
    eprintln!(
        "stalled reader: upstream produced {} KiB of {} KiB; agent VmHWM {} KiB",
        produced / 1024,
        size / 1024,
        m.hwm_kib
    );
    assert!(
        produced < 64 * MIB,
        "upstream ran {produced} bytes ahead of a reader that read nothing"
    );
    assert!(m.hwm_kib < HWM_LIMIT_KIB, "agent peak RSS {} KiB", m.hwm_kib);

    // Once the reader reads, everything arrives.
    let mut buf = Vec::new();
    let reply = tokio::time::timeout(DEADLINE * 3, client::read_response(&mut conn, &mut buf))
        .await
        .expect("in time")
        .expect("read")
        .expect("response");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len() as u64, size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_dying_mid_body_is_not_a_complete_response() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new().start(&streaming_config(&up)).await;
    let addr = agent.proxy_addr();
    for path in [
        format!("/download?bytes={}&die_after={}", 8 * MIB, MIB),
        format!("/download?bytes={}&die_after={}&chunked", 8 * MIB, MIB),
    ] {
        let (status, _, total, error) = tokio::time::timeout(DEADLINE, try_download(addr, &path))
            .await
            .unwrap_or_else(|_| panic!("{path}: the client hangs instead of seeing the failure"));
        assert_eq!(status, StatusCode::OK, "{path}");
        assert!(total <= MIB, "{path}: {total} bytes");
        assert!(
            error.is_some(),
            "{path}: a truncated body ended like a complete one ({total} bytes)"
        );
    }
}
