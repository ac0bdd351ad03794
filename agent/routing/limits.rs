//! How much work one route table may ask for. A pushed body is at most 1 MiB, but a small body
//! can still name many hostnames × many matches × many listeners, or thousands of regular
//! expressions; each of those costs memory and compile time. These limits are checked on the
//! table as written, before anything is compiled, so a table over them costs a count, not a
//! compile. They are chosen so the largest legitimate table passes: Gateway API's own per-object
//! limits (16 hostnames per HTTPRoute, 64 matches per rule, 16 header and 16 query conditions per
//! match, 64 listeners per Gateway) with room to spare, and tables of thousands of rules
//! (docs/routing.md, "Limits").

use crate::config::route_spec::{PathMatchKind, ValueMatchKind};
use crate::config::Problem;
use crate::routing::rule_source::RuleSource;

/// Rules in one table (host-map entries count as one rule each).
pub const MAX_RULES: usize = 10_000;
/// Listener scopes in one table (Gateway API: 64 listeners per Gateway).
pub const MAX_LISTENERS: usize = 64;
/// Hostnames on one rule (Gateway API: 16 per HTTPRoute).
pub const MAX_HOSTNAMES_PER_RULE: usize = 64;
/// Matches in one rule (Gateway API: 64).
pub const MAX_MATCHES_PER_RULE: usize = 64;
/// Header conditions, and query parameter conditions, in one match (Gateway API: 16 each).
pub const MAX_CONDITIONS_PER_MATCH: usize = 16;
/// Regular expressions (path, header and query matches) in one table.
pub const MAX_REGEXES: usize = 1_024;
/// Their patterns' length together, in bytes.
pub const MAX_REGEX_BYTES: usize = 128 * 1024;
/// Entries of the table's hostname indexes: per rule, its hostnames (or one) × its matches
/// (or one) × the listeners it names (or one).
pub const MAX_INDEX_ENTRIES: usize = 200_000;
/// Patterns compiled into regex sets across the table: each distinct list of regex matches (the
/// regex matches of the rules one hostname has) is one set.
pub const MAX_SET_PATTERNS: usize = 4_096;

/// The limits `sources` and `listeners` exceed, each naming the first rule (or key) over it.
/// Empty: the table may be compiled.
pub(crate) fn exceeded(sources: &[RuleSource], listeners: usize) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut over = |key: String, reason: String| problems.push(Problem { key, reason });
    if listeners > MAX_LISTENERS {
        over(
            "listeners".into(),
            format!("{listeners} listeners; at most {MAX_LISTENERS} per table"),
        );
    }
    if let Some(p) = sources.get(MAX_RULES) {
        over(
            p.key.clone(),
            format!("{} rules; at most {MAX_RULES} per table", sources.len()),
        );
    }
    let (mut regexes, mut regex_bytes, mut entries) = (0usize, 0usize, 0usize);
    let (mut regexes_said, mut bytes_said, mut entries_said) = (false, false, false);
    for p in sources {
        let per_rule = [
            ("hostnames", p.hostnames.len(), MAX_HOSTNAMES_PER_RULE),
            ("matches", p.matches.len(), MAX_MATCHES_PER_RULE),
            ("listeners", p.listeners.len(), MAX_LISTENERS),
        ];
        for (field, n, max) in per_rule {
            if n > max {
                over(
                    format!("{}.{field}", p.key),
                    format!("{n} {field}; at most {max} per rule"),
                );
            }
        }
        for (mi, m) in p.matches.iter().enumerate() {
            for (field, n) in [("headers", m.headers.len()), ("query_params", m.query_params.len())] {
                if n > MAX_CONDITIONS_PER_MATCH {
                    over(
                        format!("{}.matches[{mi}].{field}", p.key),
                        format!("{n} conditions; at most {MAX_CONDITIONS_PER_MATCH} per match"),
                    );
                }
            }
            let path = m
                .path
                .iter()
                .filter(|p| p.kind == PathMatchKind::RegularExpression)
                .map(|p| p.value.len());
            let values = m.headers.iter().chain(&m.query_params);
            let values = values
                .filter(|v| v.kind == ValueMatchKind::RegularExpression)
                .map(|v| v.value.len());
            for len in path.chain(values) {
                regexes += 1;
                regex_bytes = regex_bytes.saturating_add(len);
                if regexes > MAX_REGEXES && !std::mem::replace(&mut regexes_said, true) {
                    over(
                        format!("{}.matches[{mi}]", p.key),
                        format!("more than {MAX_REGEXES} regular expressions in the table (the limit)"),
                    );
                }
                if regex_bytes > MAX_REGEX_BYTES && !std::mem::replace(&mut bytes_said, true) {
                    over(
                        format!("{}.matches[{mi}]", p.key),
                        format!("the table's regular expressions are longer than {MAX_REGEX_BYTES} bytes together (the limit)"),
                    );
                }
            }
        }
        let rule_entries = [p.hostnames.len(), p.matches.len(), p.listeners.len()]
            .into_iter()
            .fold(1usize, |n, k| n.saturating_mul(k.max(1)));
        entries = entries.saturating_add(rule_entries);
        if entries > MAX_INDEX_ENTRIES && !std::mem::replace(&mut entries_said, true) {
            over(
                p.key.clone(),
                format!("hostnames × matches × listeners of the table's rules exceed {MAX_INDEX_ENTRIES} (the limit)"),
            );
        }
    }
    problems
}
