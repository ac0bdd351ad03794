//! A throwaway PKI made by the openssl CLI for one test: a CA and leaf certificates it signed,
//! each with its key, in a directory of the test's own. Nothing here is committed: keys exist
//! only for the run.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Pki {
    dir: PathBuf,
}

/// The extensions of a server certificate for 127.0.0.1 and `localhost`.
pub const SERVER_LOCALHOST: &str =
    "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE";

/// The extensions of a client certificate.
pub const CLIENT: &str = "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE";

/// Whether the openssl CLI is here; when not, says which test skips and why.
pub fn available(test: &str) -> bool {
    let found = Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipping {test}: the openssl CLI is not installed (Debian package openssl)");
    }
    found
}

/// Runs the openssl CLI in `dir`, failing the test with its stderr when it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl CLI (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const EC: [&str; 5] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];

/// A self-signed CA certificate `dir/ca.pem` (key `dir/ca.key`) with the subject `/CN=cn`.
pub fn make_ca(dir: &Path, cn: &str) {
    std::fs::create_dir_all(dir).expect("pki dir");
    let subject = format!("/CN={cn}");
    let mut args = vec!["req", "-x509"];
    args.extend(EC);
    args.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", &subject]);
    args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    openssl(dir, &args);
}

impl Pki {
    /// A CA named `name` under `parent/name`, with `server` ([`SERVER_LOCALHOST`]) and `client`
    /// ([`CLIENT`]) certificates.
    pub fn new(parent: &Path, name: &str) -> Pki {
        Pki::with_leaves(parent, name, &[("server", SERVER_LOCALHOST), ("client", CLIENT)])
    }

    /// A CA named `name` under `parent/name` and one certificate per `(leaf, extensions)`,
    /// written as `leaf.pem` and `leaf.key`; the extensions are openssl's `-extfile` lines.
    pub fn with_leaves(parent: &Path, name: &str, leaves: &[(&str, &str)]) -> Pki {
        let dir = parent.join(name);
        make_ca(&dir, name);
        for (leaf, ext) in leaves {
            let (key, csr, pem, extfile) = (
                format!("{leaf}.key"),
                format!("{leaf}.csr"),
                format!("{leaf}.pem"),
                format!("{leaf}.ext"),
            );
            std::fs::write(dir.join(&extfile), ext).expect("ext file");
            let subject = format!("/CN={leaf}");
            let mut args = vec!["req"];
            args.extend(EC);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            openssl(&dir, &args);
            let mut args = vec!["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key"];
            args.extend(["-CAcreateserial", "-days", "2", "-extfile", &extfile, "-out", &pem]);
            openssl(&dir, &args);
        }
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// [`Pki::path`] as a string, for config text and environment variables.
    pub fn path_str(&self, file: &str) -> String {
        self.path(file).display().to_string()
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).expect("pki file")
    }
}
