//! Secret Manager version names, as `secrets.NAME.name` gives them. Parsed while validating the
//! file, so a malformed name is a config error with its key, not a failure at boot.

/// Why a `secrets.NAME.name` is not a Secret Manager version name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretNameError {
    /// Not `projects/P/secrets/S/versions/V` or its regional form.
    #[error("{name:?}: {SHAPE}")]
    Shape { name: String },
    /// The shape is right, but a segment is empty or holds other characters.
    #[error("{name:?}: {SHAPE} (segments may hold letters, digits, '-', '_', '.')")]
    Segment { name: String },
}

const SHAPE: &str = "expected projects/P/secrets/S/versions/V or projects/P/locations/L/secrets/S/versions/V";

/// A Secret Manager version resource name, global or regional.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretVersionName {
    pub project: String,
    pub location: Option<String>,
    pub secret: String,
    pub version: String,
}

impl SecretVersionName {
    /// Parses `projects/P/secrets/S/versions/V` or `projects/P/locations/L/secrets/S/versions/V`.
    pub fn parse(name: &str) -> Result<SecretVersionName, SecretNameError> {
        let parts: Vec<&str> = name.split('/').collect();
        let ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        };
        let parsed = match parts.as_slice() {
            ["projects", p, "secrets", s, "versions", v] => SecretVersionName {
                project: (*p).to_owned(),
                location: None,
                secret: (*s).to_owned(),
                version: (*v).to_owned(),
            },
            ["projects", p, "locations", l, "secrets", s, "versions", v] => SecretVersionName {
                project: (*p).to_owned(),
                location: Some((*l).to_owned()),
                secret: (*s).to_owned(),
                version: (*v).to_owned(),
            },
            _ => return Err(SecretNameError::Shape { name: name.to_owned() }),
        };
        let all = [&parsed.project, &parsed.secret, &parsed.version];
        if all.iter().any(|s| !ok(s)) || parsed.location.as_deref().is_some_and(|l| !ok(l)) {
            return Err(SecretNameError::Segment { name: name.to_owned() });
        }
        Ok(parsed)
    }

    pub fn resource(&self) -> String {
        match &self.location {
            Some(l) => format!(
                "projects/{}/locations/{l}/secrets/{}/versions/{}",
                self.project, self.secret, self.version
            ),
            None => format!(
                "projects/{}/secrets/{}/versions/{}",
                self.project, self.secret, self.version
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_global_and_regional_names() {
        let g = SecretVersionName::parse("projects/p1/secrets/tok/versions/latest").unwrap();
        assert_eq!(g.location, None);
        assert_eq!(g.resource(), "projects/p1/secrets/tok/versions/latest");
        let r = SecretVersionName::parse("projects/p1/locations/europe-west1/secrets/tok/versions/3").unwrap();
        assert_eq!(r.location.as_deref(), Some("europe-west1"));
        assert_eq!(
            r.resource(),
            "projects/p1/locations/europe-west1/secrets/tok/versions/3"
        );
        for bad in [
            "",
            "projects/p/secrets/s",
            "projects//secrets/s/versions/1",
            "projects/p/secrets/s/versions/1/x",
            "projects/p/secrets/s?x/versions/1",
        ] {
            assert!(SecretVersionName::parse(bad).is_err(), "{bad}");
        }
    }

    /// What `check` prints for a malformed name (the same text as when the error was a string).
    #[test]
    fn errors_name_the_value_and_the_expected_shape() {
        let shape = "expected projects/P/secrets/S/versions/V or projects/P/locations/L/secrets/S/versions/V";
        let e = SecretVersionName::parse("projects/p/secrets/s").unwrap_err();
        assert_eq!(e.to_string(), format!("\"projects/p/secrets/s\": {shape}"));
        let e = SecretVersionName::parse("projects//secrets/s/versions/1").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("\"projects//secrets/s/versions/1\": {shape} (segments may hold letters, digits, '-', '_', '.')")
        );
    }
}
