//! The Prometheus text exposition format (version 0.0.4), the one writer every metric source
//! renders `/metrics` with.
//!
//! A [`Family`] writes its `# HELP` and `# TYPE` lines when it is opened, so each metric name
//! has them exactly once, then one line per sample. The format's escaping rules: in a label
//! value, backslash, double quote and line feed become `\\`, `\"` and `\n`; in HELP text,
//! backslash and line feed only (a quote stays as it is).

use std::fmt::{Display, Write as _};

/// A metric family's `# TYPE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One metric family being written into `out`: its header is already there.
pub struct Family<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl<'a> Family<'a> {
    /// Writes the family's `# HELP` and `# TYPE` lines.
    pub fn open(out: &'a mut String, name: &'a str, kind: Kind, help: &str) -> Family<'a> {
        let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(out, "# TYPE {name} {}", kind.as_str());
        Family { out, name }
    }

    /// One sample of the family itself: `name{labels} value`.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl Display) {
        self.suffixed("", labels, value);
    }

    /// One sample of a series the family's type adds to its name (a histogram's `_bucket`,
    /// `_sum` and `_count`).
    pub fn suffixed(&mut self, suffix: &str, labels: &[(&str, &str)], value: impl Display) {
        let _ = write!(self.out, "{}{suffix}", self.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (label, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{label}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A family of one sample without labels.
pub fn single(out: &mut String, name: &str, kind: Kind, help: &str, value: impl Display) {
    Family::open(out, name, kind, help).sample(&[], value);
}

/// A label value as the format needs it: backslash, double quote and line feed escaped.
pub fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// HELP text as the format needs it: backslash and line feed escaped.
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn help_escapes_backslash_and_newline_but_not_quotes() {
        assert_eq!(escape_help("a \"q\" \\ b\nc"), "a \"q\" \\\\ b\\nc");
    }

    #[test]
    fn header_once_per_family_then_one_line_per_sample() {
        let mut out = String::new();
        let mut f = Family::open(&mut out, "x_total", Kind::Counter, "Things\ncounted.");
        f.sample(&[("route", "a\"b"), ("code", "2xx")], 3);
        f.sample(&[("route", "c"), ("code", "5xx")], 0);
        single(&mut out, "y", Kind::Gauge, "Y.", 1.5);
        let mut h = Family::open(&mut out, "z_seconds", Kind::Histogram, "Z.");
        h.suffixed("_bucket", &[("le", "+Inf")], 2);
        h.suffixed("_sum", &[], 0.25);
        assert_eq!(
            out,
            "# HELP x_total Things\\ncounted.\n# TYPE x_total counter\n\
             x_total{route=\"a\\\"b\",code=\"2xx\"} 3\nx_total{route=\"c\",code=\"5xx\"} 0\n\
             # HELP y Y.\n# TYPE y gauge\ny 1.5\n\
             # HELP z_seconds Z.\n# TYPE z_seconds histogram\n\
             z_seconds_bucket{le=\"+Inf\"} 2\nz_seconds_sum 0.25\n"
        );
        for name in ["x_total", "y", "z_seconds"] {
            assert_eq!(out.matches(&format!("# HELP {name} ")).count(), 1, "{out}");
            assert_eq!(out.matches(&format!("# TYPE {name} ")).count(), 1, "{out}");
        }
    }
}
