//! GRPCRoute conformance, as the gateway controller delivers it: it converts each GRPCRoute
//! into rules of the pushed table (a method match becomes an `Exact` path
//! `/package.Service/Method`, metadata matches become header matches, section names become
//! listener scopes), with h2c backends and `hasGrpcRoute`. The routes and cases are the ones
//! of kubernetes-sigs/gateway-api's `conformance/tests/grpcroute-exact-method-matching`,
//! `grpcroute-header-matching` and `grpcroute-listener-hostname-matching` (`.go` and
//! `.yaml`, Apache-2.0, Copyright The Kubernetes Authors), written here as data.
//!
//! Client and backends speak gRPC over HTTP/2 as grpc-go does (PROTOCOL-HTTP2.md): `POST`
//! with `content-type: application/grpc` and `te: trailers`, 5-byte length-prefixed messages,
//! `grpc-status`/`grpc-message` in trailers (or a Trailers-Only response). Like grpc-go, the
//! client maps a non-gRPC HTTP answer to a status (`404` → `UNIMPLEMENTED`, the code the
//! suite expects where no route matches). The backends answer with a protobuf message naming
//! themselves and the `:authority` they saw, as the suite's echo server reports its pod.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use common::body::{self, AnyBody, Frames};
use common::client::send_h2;
use common::{AgentBuilder, ConfigText};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;

const TOKEN: &str = "grpc-conformance-token";
const SERVICE: &str = "gateway_api_conformance.grpc_echo.grpcecho.GrpcEcho";
/// The methods the suite's echo server implements.
const METHODS: [&str; 3] = ["Echo", "EchoTwo", "EchoThree"];

/// gRPC status codes used here (grpc/codes).
const OK: u32 = 0;
const UNKNOWN: u32 = 2;
const PERMISSION_DENIED: u32 = 7;
const UNIMPLEMENTED: u32 = 12;
const INTERNAL: u32 = 13;
const UNAVAILABLE: u32 = 14;
const UNAUTHENTICATED: u32 = 16;

/// One length-prefixed message: compressed flag 0, 4-byte big-endian length.
fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(u32::try_from(message.len()).expect("small message"));
    out.put_slice(message);
    out.freeze()
}

/// The messages of a body of length-prefixed frames; `None` if it is not one.
fn messages(mut body: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !body.is_empty() {
        if body.len() < 5 || body[0] != 0 {
            return None;
        }
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let rest = body.get(5..5 + len)?;
        out.push(rest.to_vec());
        body = &body[5 + len..];
    }
    Some(out)
}

/// Protobuf: field `n` as a length-delimited string (wire type 2), lengths below 128.
fn pb_string(out: &mut Vec<u8>, n: u8, s: &str) {
    out.push(n << 3 | 2);
    out.push(u8::try_from(s.len()).expect("short string"));
    out.extend_from_slice(s.as_bytes());
}

/// The backend's answer: `{1: backend, 2: authority}`.
fn decode_answer(message: &[u8]) -> (String, String) {
    let mut fields = [String::new(), String::new()];
    let mut rest = message;
    while let [tag, len, tail @ ..] = rest {
        let len = *len as usize;
        let value = String::from_utf8_lossy(&tail[..len]).into_owned();
        if let Some(slot) = fields.get_mut(usize::from(tag >> 3).wrapping_sub(1)) {
            *slot = value;
        }
        rest = &tail[len..];
    }
    let [backend, authority] = fields;
    (backend, authority)
}

fn grpc_response(status: u32, message: Option<Vec<u8>>) -> Response<AnyBody> {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(status));
    let builder = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/grpc");
    match message {
        Some(m) => builder
            .body(Frames::new().data(frame(&m)).trailers(trailers).boxed_any())
            .expect("response"),
        // Trailers-Only: the status in the only HEADERS frame.
        None => builder
            .header("grpc-status", status)
            .header("grpc-message", "unknown method")
            .body(body::empty())
            .expect("response"),
    }
}

/// A gRPC echo server over h2c (prior knowledge only, as a gRPC server without TLS is).
async fn grpc_backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let is_grpc = parts
                            .headers
                            .get("content-type")
                            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                        if parts.method != Method::POST || !is_grpc {
                            // grpc-go's answer to a request that is not gRPC.
                            let r = Response::builder()
                                .status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
                                .body(body::full("not gRPC"))
                                .expect("response");
                            return Ok::<_, Infallible>(r);
                        }
                        if messages(&body).is_none_or(|m| m.len() != 1) {
                            return Ok(grpc_response(INTERNAL, None));
                        }
                        let implemented = parts
                            .uri
                            .path()
                            .strip_prefix(&format!("/{SERVICE}/"))
                            .is_some_and(|m| METHODS.contains(&m));
                        if !implemented {
                            return Ok(grpc_response(UNIMPLEMENTED, None));
                        }
                        // The client's authority arrives as `:authority` (docs/routing.md,
                        // "The Host rule"); a `host` header, if a client sent one, wins as it
                        // does for an HTTP/2 server that reads both.
                        let authority = parts
                            .headers
                            .get("host")
                            .and_then(|h| h.to_str().ok())
                            .map(str::to_owned)
                            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
                            .unwrap_or_default();
                        let mut answer = Vec::new();
                        pb_string(&mut answer, 1, name);
                        pb_string(&mut answer, 2, &authority);
                        Ok(grpc_response(OK, Some(answer)))
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// What a gRPC client sees for one unary call.
#[derive(Debug)]
struct Outcome {
    code: u32,
    /// The backend that answered, when the call succeeded.
    backend: Option<String>,
    /// The HTTP status, and `grpc-message`: where the code came from.
    http: StatusCode,
    message: Option<String>,
}

/// grpc-go's mapping of an HTTP status without `grpc-status` (gRPC's
/// "HTTP to gRPC Status Code Mapping").
fn code_of_http(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => INTERNAL,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 => UNIMPLEMENTED,
        429 | 502 | 503 | 504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// The path of a method of the echo service.
fn method_path(method: &str) -> String {
    format!("/{SERVICE}/{method}")
}

/// One unary call to `path` (`/package.Service/Method`) with `metadata`, to `authority`,
/// through the agent.
async fn call(agent: SocketAddr, authority: &str, path: &str, metadata: &[(&str, &str)]) -> Outcome {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "grpc-conformance-test");
    for (k, v) in metadata {
        // gRPC metadata keys are lower case on the wire.
        req = req.header(k.to_ascii_lowercase(), *v);
    }
    // An empty EchoRequest.
    let r = send_h2(agent, req.body(body::full(frame(b""))).expect("request")).await;
    let grpc_status = r
        .trailers
        .as_ref()
        .and_then(|t| t.get("grpc-status"))
        .or_else(|| r.headers.get("grpc-status"))
        .and_then(|v| v.to_str().ok()?.parse::<u32>().ok());
    let code = match grpc_status {
        Some(code) if r.status == StatusCode::OK => code,
        _ if r.status != StatusCode::OK => code_of_http(r.status),
        // HTTP 200 without a grpc-status: a broken stream (grpc-go: INTERNAL).
        _ => INTERNAL,
    };
    let message = r
        .trailers
        .as_ref()
        .and_then(|t| t.get("grpc-message"))
        .or_else(|| r.headers.get("grpc-message"))
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let backend = (code == OK).then(|| {
        let m = messages(&r.body).expect("length-prefixed messages");
        assert_eq!(m.len(), 1, "one answer");
        let (backend, seen_authority) = decode_answer(&m[0]);
        assert_eq!(seen_authority, authority, "the backend sees the client's :authority");
        backend
    });
    Outcome {
        code,
        backend,
        http: r.status,
        message,
    }
}

/// An agent fed by the config API, and the three backends of the suite.
struct Gateway {
    agent: common::Agent,
    backends: Vec<(String, SocketAddr)>,
}

impl Gateway {
    async fn start() -> Gateway {
        let config = ConfigText::new()
            .env_secret("config_token", "GRPC_CONFORMANCE_TOKEN")
            .routes("source = \"config-api\"")
            .raw("[config_api]\nlisten = \"127.0.0.1:0\"\nauth_secret = \"config_token\"\npersist = false\n");
        let agent = AgentBuilder::new()
            .env("GRPC_CONFORMANCE_TOKEN", TOKEN)
            .start(&config)
            .await;
        let mut backends = Vec::new();
        for name in [
            "grpc-infra-backend-v1",
            "grpc-infra-backend-v2",
            "grpc-infra-backend-v3",
        ] {
            backends.push((name.to_owned(), grpc_backend(name).await));
        }
        Gateway { agent, backends }
    }

    /// A backend as the controller renders a backendRef with `appProtocol: kubernetes.io/h2c`.
    fn backend(&self, name: &str) -> Value {
        let addr = self
            .backends
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .expect("known backend");
        json!({"url": format!("http://{addr}"), "weight": 1, "protocol": "h2c", "filters": null})
    }

    async fn push(&self, table: Value) {
        let status = reqwest::Client::new()
            .put(format!("http://{}/config", self.agent.config_api_addr()))
            .bearer_auth(TOKEN)
            .json(&table)
            .send()
            .await
            .expect("config api answers")
            .status();
        assert_eq!(status.as_u16(), 200, "push refused");
    }

    async fn expect(&self, authority: &str, method: &str, metadata: Metadata<'_>, want: Expected<'_>) {
        let got = call(self.agent.proxy_addr(), authority, &method_path(method), metadata).await;
        let want = match want {
            Ok(backend) => (OK, Some(backend.to_owned())),
            Err(code) => (code, None),
        };
        assert_eq!(
            (got.code, got.backend.clone()),
            want,
            "{authority} {method} {metadata:?}: {got:?}"
        );
    }
}

fn exact_method(method: &str) -> Value {
    json!({"path": {"type": "Exact", "value": method_path(method)}, "headers": null})
}

fn headers(pairs: &[(&str, &str)]) -> Value {
    let headers: Vec<Value> = pairs
        .iter()
        .map(|(n, v)| json!({"type": "Exact", "name": n, "value": v}))
        .collect();
    json!({"path": {"type": "PathPrefix", "value": "/"}, "headers": headers})
}

/// GRPCExactMethodMatching: two rules with method matches; a third method has no route.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_exact_method_matching() {
    let gw = Gateway::start().await;
    gw.push(json!({"version": 1, "hasGrpcRoute": true, "rules": [
        {"hostnames": null, "matches": [exact_method("Echo")], "backends": [gw.backend("grpc-infra-backend-v1")]},
        {"hostnames": null, "matches": [exact_method("EchoTwo")], "backends": [gw.backend("grpc-infra-backend-v2")]},
    ]}))
    .await;
    let host = "grpc.example.com";
    gw.expect(host, "Echo", &[], Ok("grpc-infra-backend-v1")).await;
    gw.expect(host, "EchoTwo", &[], Ok("grpc-infra-backend-v2")).await;
    gw.expect(host, "EchoThree", &[], Err(UNIMPLEMENTED)).await;
}

type Metadata<'a> = &'a [(&'a str, &'a str)];
/// The backend that must answer, or the gRPC status.
type Expected<'a> = Result<&'a str, u32>;

/// GRPCRouteHeaderMatching: metadata matches ANDed within a match, matches ORed, and the
/// match with more header conditions first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_route_header_matching() {
    let gw = Gateway::start().await;
    let (v1, v2) = (gw.backend("grpc-infra-backend-v1"), gw.backend("grpc-infra-backend-v2"));
    gw.push(json!({"version": 1, "hasGrpcRoute": true, "rules": [
        {"matches": [headers(&[("version", "one")])], "backends": [v1]},
        {"matches": [headers(&[("version", "two")])], "backends": [v2]},
        {"matches": [headers(&[("version", "two"), ("color", "orange")])], "backends": [v1]},
        {"matches": [headers(&[("color", "blue")]), headers(&[("color", "green")])], "backends": [v1]},
        {"matches": [headers(&[("color", "red")]), headers(&[("color", "yellow")])], "backends": [v2]},
    ]}))
    .await;
    let (b1, b2) = ("grpc-infra-backend-v1", "grpc-infra-backend-v2");
    let cases: [(Metadata, Expected); 11] = [
        (&[("Version", "one")], Ok(b1)),
        (&[("Version", "two")], Ok(b2)),
        (&[("Version", "two"), ("Color", "orange")], Ok(b1)),
        (&[("Version", "two"), ("Color", "blue")], Ok(b2)),
        (&[("Color", "orange")], Err(UNIMPLEMENTED)),
        (&[("Some-Other-Header", "one")], Err(UNIMPLEMENTED)),
        (&[("Color", "blue")], Ok(b1)),
        (&[("Color", "green")], Ok(b1)),
        (&[("Color", "red")], Ok(b2)),
        (&[("Color", "yellow")], Ok(b2)),
        (&[("Color", "purple")], Err(UNIMPLEMENTED)),
    ];
    for (metadata, want) in cases {
        gw.expect("grpc.example.com", "Echo", metadata, want).await;
    }
}

/// GRPCRouteListenerHostnameMatching: four listeners on one port, routes attached by section
/// name; the most specific listener owns the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_route_listener_hostname_matching() {
    let gw = Gateway::start().await;
    gw.push(json!({"version": 1, "hasGrpcRoute": true,
    "listeners": [
        {"name": "listener-1", "hostname": "bar.com"},
        {"name": "listener-2", "hostname": "foo.bar.com"},
        {"name": "listener-3", "hostname": "*.bar.com"},
        {"name": "listener-4", "hostname": "*.foo.com"},
    ],
    "rules": [
        {"listeners": ["listener-1"], "backends": [gw.backend("grpc-infra-backend-v1")]},
        {"listeners": ["listener-2"], "backends": [gw.backend("grpc-infra-backend-v2")]},
        {"listeners": ["listener-3", "listener-4"], "backends": [gw.backend("grpc-infra-backend-v3")]},
    ]}))
    .await;
    let (b1, b2, b3) = (
        "grpc-infra-backend-v1",
        "grpc-infra-backend-v2",
        "grpc-infra-backend-v3",
    );
    for (authority, want) in [
        ("bar.com", Ok(b1)),
        ("foo.bar.com", Ok(b2)),
        ("baz.bar.com", Ok(b3)),
        ("boo.bar.com", Ok(b3)),
        ("multiple.prefixes.bar.com", Ok(b3)),
        ("multiple.prefixes.foo.com", Ok(b3)),
        ("foo.com", Err(UNIMPLEMENTED)),
        ("no.matching.host", Err(UNIMPLEMENTED)),
    ] {
        gw.expect(authority, "Echo", &[], want).await;
    }
}

/// The backend's own gRPC status (here UNIMPLEMENTED in a Trailers-Only response, for a
/// method the route sends but the server lacks) reaches the client unchanged: the agent adds
/// nothing and drops nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backends_grpc_status_reaches_the_client() {
    let gw = Gateway::start().await;
    gw.push(json!({"version": 1, "hasGrpcRoute": true, "rules": [
        {"matches": [{"path": {"type": "PathPrefix", "value": format!("/{SERVICE}")}}],
         "backends": [gw.backend("grpc-infra-backend-v1")]},
    ]}))
    .await;
    let got = call(gw.agent.proxy_addr(), "grpc.example.com", &method_path("EchoFour"), &[]).await;
    assert_eq!(
        (got.code, got.http, got.message.as_deref()),
        (UNIMPLEMENTED, StatusCode::OK, Some("unknown method")),
        "{got:?}"
    );
    // Outside the route's service: the agent's own 404, which a gRPC client reads the same way.
    let got = call(gw.agent.proxy_addr(), "grpc.example.com", "/other.Service/Echo", &[]).await;
    assert_eq!((got.code, got.http), (UNIMPLEMENTED, StatusCode::NOT_FOUND), "{got:?}");
    gw.expect("grpc.example.com", "Echo", &[], Ok("grpc-infra-backend-v1"))
        .await;
}
