//! Request framing as the bare-LF guard (agent/framing.rs) and hyper each read it, through the
//! real binary. The guard must follow every body hyper reads on a kept-alive connection, or the
//! heads after it reach hyper unchecked. Found by fuzz/fuzz_targets/head_guard_httparse.rs.

mod common;

use common::client;
use common::{AgentBuilder, ConfigText, FakeUpstream, Wire};
use tokio::io::AsyncWriteExt;

/// hyper reads a chunked body when the *last* `Transfer-Encoding` line ends in `chunked`,
/// whatever the lines before it say, and keeps the connection: the next head is still a head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_lf_head_after_a_body_framed_by_the_last_transfer_encoding_line_gets_400() {
    let up = FakeUpstream::start(Wire::Http1).await;
    let agent = AgentBuilder::new()
        .start(&ConfigText::new().host("app.test", &up.url()))
        .await;
    for codings in [
        "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    ] {
        let first = format!("POST /first HTTP/1.1\r\nHost: app.test\r\n{codings}\r\n3\r\na\nb\r\n0\r\n\r\n");
        let mut s = tokio::net::TcpStream::connect(agent.proxy_addr()).await.unwrap();
        s.write_all(first.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        let r = client::read_response(&mut s, &mut buf)
            .await
            .unwrap()
            .expect("a response");
        assert_eq!(r.status, 200, "{codings:?}: {}", r.text());
        // Only once the first answer is in, so the agent reads the second head on its own.
        s.write_all(b"GET /smuggled HTTP/1.1\nHost: app.test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let r = client::read_response(&mut s, &mut buf)
            .await
            .unwrap()
            .expect("a response");
        assert_eq!(r.status, 400, "{codings:?}: {}", r.text());
        assert!(r.text().contains("bare LF"), "{}", r.text());
    }
    assert_eq!(up.requests(), 2, "the two POSTs, never the bare-LF GET");
}
