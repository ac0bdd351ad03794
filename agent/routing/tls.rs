//! TLS towards upstreams: whom to trust (the webpki roots, or a configured CA bundle, globally
//! or per backend), which name to send as SNI and to verify, and a client certificate for mTLS.
//! A backend's own settings (a `BackendTLSPolicy` pushed by the controller, or `tls` in TOML)
//! are compiled with the route table into an [`UpstreamTls`]: data only. The proxy keeps the
//! connection pool for each of them (`crate::proxy`), so routing never depends on the proxy.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::route_spec::BackendTlsSpec;

/// The trust anchors: the CA bundle in `pem`, or webpki's (Mozilla's) roots.
pub fn roots(pem: Option<&[u8]>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    match pem {
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| format!("not a PEM certificate bundle: {e}"))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("a CA certificate cannot be used: {e}"))?;
            }
            if roots.is_empty() {
                return Err("the CA bundle holds no certificate".into());
            }
        }
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client settings with `roots` and no client certificate.
pub fn client_config(roots: RootCertStore) -> Result<ClientConfig, String> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// One backend's compiled TLS settings. The table holds each in an `Arc`, which is also the
/// proxy's key for the backend's connection pool.
pub struct UpstreamTls {
    pub config: ClientConfig,
    /// SNI (and the verified name when no SANs are listed); `None`: the URL's host.
    pub server_name: Option<String>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// The controller sends Go `[]byte` as base64; TOML writes PEM directly.
fn pem_or_base64(value: &str, what: &str) -> Result<Vec<u8>, String> {
    use base64::Engine as _;
    if value.trim_start().starts_with("-----BEGIN") {
        return Ok(value.as_bytes().to_vec());
    }
    base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| format!("{what} is neither PEM nor base64 of PEM"))
}

impl UpstreamTls {
    /// Compiles a backend's `tls`. `default_ca` is the global bundle (`proxy.ca_file`), used
    /// when the backend names none. Errors say which field is wrong, never its content.
    pub fn compile(spec: &BackendTlsSpec, default_ca: Option<&[u8]>) -> Result<UpstreamTls, (String, String)> {
        let err = |field: &str, reason: String| (field.to_owned(), reason);
        let file;
        let ca: Option<&[u8]> = match (&spec.ca_bundle, &spec.ca_file) {
            (Some(_), Some(_)) => return Err(err("caFile", "give caBundle or caFile, not both".into())),
            (Some(pem), None) => Some(pem.as_bytes()),
            (None, Some(path)) => {
                file =
                    std::fs::read(path).map_err(|e| err("caFile", format!("cannot read {}: {e}", path.display())))?;
                Some(&file)
            }
            (None, None) => default_ca,
        };
        let field = if spec.ca_file.is_some() { "caFile" } else { "caBundle" };
        let roots = Arc::new(roots(ca).map_err(|e| err(field, e))?);
        if !spec.subject_alt_name_uris.is_empty() {
            // webpki verifies DNS and IP names only; accepting a URI SAN policy without checking
            // it would trust any certificate the CA signed.
            return Err(err(
                "subjectAltNameUris",
                "URI SANs cannot be verified by this build; use DNS subjectAltNames".into(),
            ));
        }
        let mut sans = Vec::new();
        for (i, san) in spec.subject_alt_names.iter().enumerate() {
            let name = ServerName::try_from(san.clone())
                .map_err(|_| err(&format!("subjectAltNames[{i}]"), format!("{san:?} is not a DNS name")))?;
            sans.push(name);
        }
        if let Some(name) = &spec.server_name {
            ServerName::try_from(name.clone()).map_err(|_| err("serverName", format!("{name:?} is not a DNS name")))?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| err(field, e.to_string()))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(field, e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SanVerifier { webpki, sans }));
        let config = match (&spec.client_cert_pem, &spec.client_key_pem) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let cert = pem_or_base64(cert, "clientCertPem").map_err(|e| err("clientCertPem", e))?;
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
                    .collect::<Result<_, _>>()
                    .map_err(|e| err("clientCertPem", format!("not a PEM certificate chain: {e}")))?;
                if chain.is_empty() {
                    return Err(err("clientCertPem", "holds no certificate".into()));
                }
                let key = pem_or_base64(key, "clientKeyPem").map_err(|e| err("clientKeyPem", e))?;
                let key = PrivateKeyDer::from_pem_slice(&key)
                    .map_err(|_| err("clientKeyPem", "not a PEM private key".into()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| err("clientKeyPem", format!("does not fit the certificate: {e}")))?
            }
            // Half a key pair must not quietly become one-way TLS.
            (Some(_), None) => return Err(err("clientKeyPem", "clientCertPem needs clientKeyPem".into())),
            (None, Some(_)) => return Err(err("clientCertPem", "clientKeyPem needs clientCertPem".into())),
        };
        Ok(UpstreamTls {
            config,
            server_name: spec.server_name.clone(),
        })
    }
}

/// Verifies the chain with webpki; the name checked is the SNI name, or, when SANs are listed
/// (Gateway API: then `serverName` is only the SNI), any one of them.
#[derive(Debug)]
struct SanVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    sans: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.sans.is_empty() {
            return self
                .webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        }
        let mut last = None;
        for san in &self.sans {
            match self
                .webpki
                .verify_server_cert(end_entity, intermediates, san, ocsp_response, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(rustls::Error::General("no subjectAltNames".into())))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}
