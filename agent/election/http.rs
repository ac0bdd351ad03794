//! The HTTP client each store's client starts from: no proxy from the environment, rustls, short
//! connect and idle timeouts, and the CA bundle the configuration names as the only extra root.

use std::time::Duration;

/// A client builder with the stores' common settings and `ca_pem`'s certificates trusted. The
/// error names what failed ("CA bundle") and why. A bundle that holds no certificate is refused:
/// it would leave the system roots alone trusted, quietly.
pub(super) fn builder(ca_pem: Option<&[u8]>) -> Result<reqwest::ClientBuilder, (&'static str, String)> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true);
    if let Some(pem) = ca_pem {
        let certs =
            reqwest::Certificate::from_pem_bundle(pem).map_err(|e| ("CA bundle", crate::errors::error_chain(&e)))?;
        if certs.is_empty() {
            return Err(("CA bundle", "holds no PEM certificate".to_owned()));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    /// Both stores' clients start here: a CA file that holds no certificate is refused, not
    /// read as "no extra root".
    #[test]
    fn a_ca_bundle_without_a_certificate_is_refused() {
        for pem in [
            &b""[..],
            b"just text\n",
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        ] {
            match super::builder(Some(pem)) {
                Err((what, why)) => assert_eq!((what, why.as_str()), ("CA bundle", "holds no PEM certificate")),
                Ok(_) => panic!("accepted {:?}", String::from_utf8_lossy(pem)),
            }
        }
        assert!(super::builder(None).is_ok());
    }
}
