//! The HTTP client each store's client starts from: no proxy from the environment, rustls, short
//! connect and idle timeouts, and the CA bundle the configuration names as the only extra root.

use std::time::Duration;

/// A client builder with the stores' common settings and `ca_pem`'s certificates trusted. The
/// error names what failed ("CA bundle") with reqwest's error.
pub(super) fn builder(ca_pem: Option<&[u8]>) -> Result<reqwest::ClientBuilder, (&'static str, reqwest::Error)> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true);
    if let Some(pem) = ca_pem {
        for cert in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| ("CA bundle", e))? {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}
