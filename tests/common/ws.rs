//! The parts of RFC 6455 (WebSocket) the tests need, on both sides: the opening handshake's
//! `Sec-WebSocket-Accept` (§4.2.2: base64 of SHA-1 of the key + a fixed GUID) and framing
//! (§5.2), with client-to-server frames masked as §5.3 requires.

use std::io;
use std::net::SocketAddr;

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::client::{read_response, RawReply};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

pub fn accept_key(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsFrame {
    pub fin: bool,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

/// One frame on the wire; `mask` is required from a client, forbidden from a server.
pub fn encode(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// Reads one frame (unmasking it). `Ok(None)` on a clean EOF between frames.
pub async fn read_frame(stream: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>) -> io::Result<Option<WsFrame>> {
    async fn need(stream: &mut (impl AsyncRead + Unpin), buf: &mut Vec<u8>, n: usize) -> io::Result<bool> {
        while buf.len() < n {
            let mut chunk = [0u8; 8192];
            let got = stream.read(&mut chunk).await?;
            if got == 0 {
                return Ok(false);
            }
            buf.extend_from_slice(&chunk[..got]);
        }
        Ok(true)
    }
    if !need(stream, buf, 2).await? {
        return if buf.is_empty() {
            Ok(None)
        } else {
            Err(io::ErrorKind::UnexpectedEof.into())
        };
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let (len, mut at) = match buf[1] & 0x7F {
        126 => {
            if !need(stream, buf, 4).await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            (u64::from(u16::from_be_bytes([buf[2], buf[3]])), 4)
        }
        127 => {
            if !need(stream, buf, 10).await? {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        if !need(stream, buf, at + 4).await? {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let m = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        at += 4;
        Some(m)
    } else {
        None
    };
    let len = usize::try_from(len).map_err(|_| io::Error::other("frame too long"))?;
    if !need(stream, buf, at + len).await? {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let mut payload: Vec<u8> = buf[at..at + len].to_vec();
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    buf.drain(..at + len);
    Ok(Some(WsFrame {
        fin,
        opcode,
        masked,
        payload,
    }))
}

/// Server side of an upgraded connection: echoes data frames, answers pings, returns the
/// close frame and ends. Unmasked client frames are a protocol error (§5.1): close with 1002.
pub async fn echo_server<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> io::Result<()> {
    let mut buf = Vec::new();
    while let Some(frame) = read_frame(&mut io, &mut buf).await? {
        if !frame.masked {
            io.write_all(&encode(OP_CLOSE, &1002u16.to_be_bytes(), None)).await?;
            return Ok(());
        }
        match frame.opcode {
            OP_CLOSE => {
                io.write_all(&encode(OP_CLOSE, &frame.payload, None)).await?;
                return Ok(());
            }
            OP_PING => io.write_all(&encode(OP_PONG, &frame.payload, None)).await?,
            op => io.write_all(&encode(op, &frame.payload, None)).await?,
        }
    }
    Ok(())
}

/// A client connection after a successful opening handshake.
pub struct WsClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    pub handshake: RawReply,
    mask_seed: u32,
}

impl WsClient {
    /// Sends the opening handshake to `path` with `Host: host` plus `extra` header lines;
    /// returns the client (whatever the status) so tests can assert on it.
    pub async fn connect(addr: SocketAddr, host: &str, path: &str, extra: &[(&str, &str)]) -> WsClient {
        let key = base64::engine::general_purpose::STANDARD.encode(b"tunnel-agent-key");
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n"
        );
        for (k, v) in extra {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut stream = TcpStream::connect(addr).await.expect("connect for WebSocket");
        stream.write_all(req.as_bytes()).await.expect("send handshake");
        let mut buf = Vec::new();
        let handshake = tokio::time::timeout(super::DEADLINE, read_response(&mut stream, &mut buf))
            .await
            .expect("handshake answered in time")
            .expect("read handshake")
            .expect("handshake answered");
        if handshake.status == 101 {
            assert_eq!(
                handshake.header("sec-websocket-accept"),
                Some(accept_key(&key).as_str()),
                "Sec-WebSocket-Accept must match the key (RFC 6455 §4.2.2)"
            );
        }
        WsClient {
            stream,
            buf,
            handshake,
            mask_seed: 0x1234_5678,
        }
    }

    pub async fn send(&mut self, opcode: u8, payload: &[u8]) {
        self.mask_seed = self.mask_seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
        let frame = encode(opcode, payload, Some(self.mask_seed.to_be_bytes()));
        self.stream.write_all(&frame).await.expect("send frame");
    }

    pub async fn recv(&mut self) -> WsFrame {
        tokio::time::timeout(super::DEADLINE, read_frame(&mut self.stream, &mut self.buf))
            .await
            .expect("frame arrives in time")
            .expect("read frame")
            .expect("connection still open")
    }
}
