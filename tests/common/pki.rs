//! A throwaway PKI made by the openssl CLI for one test: a CA, a server certificate for
//! 127.0.0.1 and `localhost`, and a client certificate, each with its key, in a directory of
//! the test's own. Nothing here is committed: keys exist only for the run.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Pki {
    dir: PathBuf,
}

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

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl CLI");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pki {
    /// A CA named `name` under `parent/name`, with `server` and `client` certificates.
    pub fn new(parent: &Path, name: &str) -> Pki {
        let dir = parent.join(name);
        std::fs::create_dir_all(&dir).expect("pki dir");
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
        let subject = format!("/CN={name}");
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", &subject]);
        args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
        args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
        openssl(&dir, &args);
        for (leaf, ext) in [
            (
                "server",
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE",
            ),
            ("client", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE"),
        ] {
            std::fs::write(dir.join(format!("{leaf}.ext")), ext).expect("ext file");
            let (key, csr, pem) = (format!("{leaf}.key"), format!("{leaf}.csr"), format!("{leaf}.pem"));
            let subject = format!("/CN={leaf}");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
            openssl(&dir, &args);
            let ext = format!("{leaf}.ext");
            openssl(
                &dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                    "-out",
                    &pem,
                ],
            );
        }
        Pki { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path(file)).expect("pki file")
    }
}
