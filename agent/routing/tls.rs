//! TLS towards upstreams: whom to trust (the webpki roots, the system store, or a configured CA
//! bundle, globally or per backend), which name to send as SNI and to verify, and a client certificate for mTLS.
//! A backend's own settings (a `BackendTLSPolicy` pushed by the controller, or `tls` in TOML)
//! are compiled with the route table into an [`UpstreamTls`]: data only. The proxy keeps the
//! connection pool for each of them (`crate::proxy`), so routing never depends on the proxy.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, verify_server_name, WebPkiServerVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

use crate::config::route_spec::BackendTlsSpec;
use crate::config::{ProxySection, TrustStore};
use crate::routing::error::RuleError;

/// Largest CA bundle accepted, inline (`caBundle`) or read from a file (`ca_file`): a few
/// times Mozilla's whole bundle (about 220 KB), so any real bundle fits and a device or a
/// huge file cannot grow memory without bound.
pub const MAX_CA_BUNDLE_BYTES: usize = 512 * 1024;

/// Reads a CA bundle the host's admin named in the local TOML (`proxy.ca_file`, a TOML
/// backend's `tls.ca_file`; a pushed table cannot name files). Only a regular file of at most
/// [`MAX_CA_BUNDLE_BYTES`] is read ([`crate::files::read_regular`]).
pub fn read_ca_file(path: &std::path::Path) -> Result<Vec<u8>, RuleError> {
    use crate::files::ReadError;
    crate::files::read_regular(path, MAX_CA_BUNDLE_BYTES as u64).map_err(|e| {
        let path = path.display();
        match e {
            ReadError::Io(e) => format!("cannot read {path}: {e}"),
            ReadError::NotRegular => format!("{path} is not a regular file"),
            ReadError::TooLarge(_) => {
                format!("{path} is larger than {MAX_CA_BUNDLE_BYTES} bytes; a CA bundle is far smaller")
            }
        }
        .into()
    })
}

/// The trust anchors: the CA bundle in `pem`, or webpki's (Mozilla's) roots.
pub fn roots(pem: Option<&[u8]>) -> Result<RootCertStore, RuleError> {
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

/// The operating system's trust store, as rustls-native-certs finds it (on Linux the file and
/// directory OpenSSL would use, or `SSL_CERT_FILE` / `SSL_CERT_DIR`). Certificates it cannot
/// parse are skipped; a store that yields none is an error, since it would trust nothing.
pub fn system_roots() -> Result<RootCertStore, RuleError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (_, unusable) = roots.add_parsable_certificates(found.certs);
    let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
    if roots.is_empty() {
        let why = if errors.is_empty() {
            "no certificate found".to_owned()
        } else {
            errors.join("; ")
        };
        return Err(format!(
            "the system trust store holds no usable certificate ({why}); install ca-certificates, \
             or point SSL_CERT_FILE at a PEM bundle"
        )
        .into());
    }
    if unusable > 0 || !errors.is_empty() {
        tracing::warn!(
            usable = roots.len(),
            unusable,
            errors = %errors.join("; "),
            "parts of the system trust store could not be read; using the rest"
        );
    }
    Ok(roots)
}

/// The trust anchors of every `https://` upstream without a CA of its own: `proxy.ca_file`,
/// else `proxy.trust`. Loaded on first use and kept, so a table compile reads the file or the
/// store once, and only when some backend needs it.
pub struct DefaultRoots<'a> {
    proxy: &'a ProxySection,
    loaded: std::cell::OnceCell<Result<Arc<RootCertStore>, (String, String)>>,
}

impl<'a> DefaultRoots<'a> {
    pub fn new(proxy: &'a ProxySection) -> DefaultRoots<'a> {
        DefaultRoots {
            proxy,
            loaded: std::cell::OnceCell::new(),
        }
    }

    /// The anchors, or the config key at fault and why.
    pub fn get(&self) -> Result<Arc<RootCertStore>, (String, String)> {
        self.loaded
            .get_or_init(|| {
                let loaded = match (&self.proxy.ca_file, self.proxy.trust) {
                    (Some(path), _) => read_ca_file(path)
                        .and_then(|pem| roots(Some(&pem)))
                        .map_err(|e| ("proxy.ca_file".to_owned(), e.to_string())),
                    (None, Some(TrustStore::System)) => {
                        system_roots().map_err(|e| ("proxy.trust".to_owned(), e.to_string()))
                    }
                    (None, Some(TrustStore::Webpki) | None) => {
                        roots(None).map_err(|e| ("proxy.trust".to_owned(), e.to_string()))
                    }
                };
                loaded.map(Arc::new)
            })
            .clone()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client settings with `roots` and no client certificate.
pub fn client_config(roots: RootCertStore) -> Result<ClientConfig, RuleError> {
    Ok(ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| RuleError::new(e.to_string()))?
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

/// Why a backend's `tls` cannot be compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsError {
    /// A field of the backend's `tls` (its name, and why).
    Field(String, String),
    /// The default anchors it needs (`proxy.ca_file`, `proxy.trust`) cannot be loaded.
    Default(String, String),
}

/// The controller sends Go `[]byte` as base64; TOML writes PEM directly.
fn pem_or_base64(value: &str, what: &str) -> Result<Vec<u8>, RuleError> {
    use base64::Engine as _;
    if value.trim_start().starts_with("-----BEGIN") {
        return Ok(value.as_bytes().to_vec());
    }
    base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|_| RuleError::new(format!("{what} is neither PEM nor base64 of PEM")))
}

impl UpstreamTls {
    /// Compiles a backend's `tls`. `default_roots` anchor it when it names no CA. Errors say
    /// which field is wrong (relative to the backend's `tls`, or a `proxy.` key when the
    /// default anchors cannot be loaded), never its content.
    pub fn compile(spec: &BackendTlsSpec, default_roots: &DefaultRoots<'_>) -> Result<UpstreamTls, TlsError> {
        let err = |field: &str, reason: String| TlsError::Field(field.to_owned(), reason);
        let field = if spec.ca_file.is_some() { "caFile" } else { "caBundle" };
        let roots = match (&spec.ca_bundle, &spec.ca_file) {
            (Some(_), Some(_)) => return Err(err("caFile", "give caBundle or caFile, not both".into())),
            (Some(pem), None) if pem.len() > MAX_CA_BUNDLE_BYTES => {
                return Err(err(
                    field,
                    format!("{} bytes; a CA bundle may be at most {MAX_CA_BUNDLE_BYTES}", pem.len()),
                ))
            }
            (Some(pem), None) => Arc::new(roots(Some(pem.as_bytes())).map_err(|e| err(field, e.to_string()))?),
            (None, Some(path)) => {
                let pem = read_ca_file(path).map_err(|e| err("caFile", e.to_string()))?;
                Arc::new(roots(Some(&pem)).map_err(|e| err(field, e.to_string()))?)
            }
            (None, None) => default_roots
                .get()
                .map_err(|(key, reason)| TlsError::Default(key, reason))?,
        };
        let mut dns_sans = Vec::new();
        for (i, san) in spec.subject_alt_names.iter().enumerate() {
            let name = ServerName::try_from(san.clone())
                .map_err(|_| err(&format!("subjectAltNames[{i}]"), format!("{san:?} is not a DNS name")))?;
            dns_sans.push(name);
        }
        for (i, uri) in spec.subject_alt_name_uris.iter().enumerate() {
            // Compared byte for byte with the certificate's URIs (the controller's semantics);
            // only a value that can never match is refused.
            if uri.is_empty() || !uri.contains(':') || uri.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(err(
                    &format!("subjectAltNameUris[{i}]"),
                    format!("{uri:?} is not an absolute URI"),
                ));
            }
        }
        if let Some(name) = &spec.server_name {
            ServerName::try_from(name.clone()).map_err(|_| err("serverName", format!("{name:?} is not a DNS name")))?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| err(field, e.to_string()))?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| err(field, e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SanVerifier {
                webpki,
                roots,
                algorithms: provider().signature_verification_algorithms,
                dns_sans,
                uri_sans: spec.subject_alt_name_uris.clone(),
            }));
        let config = match (&spec.client_cert_pem, &spec.client_key_pem) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let cert = pem_or_base64(cert, "clientCertPem").map_err(|e| err("clientCertPem", e.to_string()))?;
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert)
                    .collect::<Result<_, _>>()
                    .map_err(|e| err("clientCertPem", format!("not a PEM certificate chain: {e}")))?;
                if chain.is_empty() {
                    return Err(err("clientCertPem", "holds no certificate".into()));
                }
                let key = pem_or_base64(key, "clientKeyPem").map_err(|e| err("clientKeyPem", e.to_string()))?;
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
/// (Gateway API: then `serverName` is only the SNI), any one of them: a DNS SAN as webpki
/// matches a hostname (wildcards included), a URI SAN (e.g. a SPIFFE ID) by exact equality with
/// one of the leaf's URI SANs, as the controller's own proxy compares them.
#[derive(Debug)]
struct SanVerifier {
    /// For the handshake signatures, and the chain when no SANs are listed.
    webpki: Arc<WebPkiServerVerifier>,
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    dns_sans: Vec<ServerName<'static>>,
    uri_sans: Vec<String>,
}

/// Why a certificate with a valid chain was refused: it carries none of the listed SANs. The
/// proxy logs it with the 502 (names only: SANs are not secret).
struct NoListedSan {
    expected: String,
    presented: String,
}

impl std::fmt::Display for NoListedSan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "certificate carries none of the subjectAltNames {}; it presents {}",
            self.expected, self.presented
        )
    }
}

/// rustls shows a `CertificateError::Other` with `Debug`: keep the log line readable.
impl std::fmt::Debug for NoListedSan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for NoListedSan {}

impl SanVerifier {
    fn mismatch(&self, leaf: &webpki::EndEntityCert<'_>) -> rustls::Error {
        let expected: Vec<String> = self
            .dns_sans
            .iter()
            .map(|n| format!("DNS:{}", n.to_str()))
            .chain(self.uri_sans.iter().map(|u| format!("URI:{u}")))
            .collect();
        let presented: Vec<String> = leaf
            .valid_dns_names()
            .map(|n| format!("DNS:{n}"))
            .chain(leaf.valid_uri_names().map(|u| format!("URI:{u}")))
            .collect();
        let list = |v: Vec<String>| if v.is_empty() { "none".to_owned() } else { v.join(", ") };
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(NoListedSan {
            expected: list(expected),
            presented: list(presented),
        }))))
    }
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
        if self.dns_sans.is_empty() && self.uri_sans.is_empty() {
            return self
                .webpki
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now);
        }
        // Chain, validity and serverAuth usage first: the same checks as webpki's verifier
        // without its name check, which the SANs replace.
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(&parsed, &self.roots, intermediates, now, self.algorithms.all)?;
        if self.dns_sans.iter().any(|san| verify_server_name(&parsed, san).is_ok()) {
            return Ok(ServerCertVerified::assertion());
        }
        // The leaf parsed above, so this parse cannot fail differently.
        let leaf = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))?;
        if !self.uri_sans.is_empty()
            && leaf
                .valid_uri_names()
                .any(|presented| self.uri_sans.iter().any(|u| u == presented))
        {
            return Ok(ServerCertVerified::assertion());
        }
        Err(self.mismatch(&leaf))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn compile_uris(uris: &[&str]) -> Result<UpstreamTls, TlsError> {
        let spec = BackendTlsSpec {
            subject_alt_name_uris: uris.iter().map(|u| (*u).to_owned()).collect(),
            ..BackendTlsSpec::default()
        };
        UpstreamTls::compile(&spec, &DefaultRoots::new(&ProxySection::default()))
    }

    #[test]
    fn uri_sans_are_accepted_and_values_that_can_never_match_are_refused() {
        assert!(compile_uris(&["spiffe://cluster.local/ns/shop/sa/api", "urn:example:a"]).is_ok());
        for bad in ["", "no-scheme", "spiffe://a b"] {
            let TlsError::Field(field, reason) = compile_uris(&["spiffe://ok/x", bad]).expect_err(bad) else {
                panic!("{bad:?}: not a field error");
            };
            assert_eq!(field, "subjectAltNameUris[1]", "{bad:?}");
            assert!(reason.contains("not an absolute URI"), "{reason}");
        }
    }
}
