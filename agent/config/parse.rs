//! Reading a config file: every parser error with its key and position, not only the first.

use std::path::Path;

use super::{Config, ConfigError, ParseProblem, Problem, RouteCheck};

impl Config {
    /// Reads, parses and validates `path`; `route_check` checks the route contents.
    pub fn load(path: &Path, route_check: RouteCheck) -> Result<Config, ConfigError> {
        // The environment mode without a file: its variables over the defaults.
        if path.as_os_str().is_empty() && super::env::active().is_some() {
            let mut config = Self::parse(path, "", route_check)?;
            super::env::writable_dirs(&mut config.agent);
            return Ok(config);
        }
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            problems: vec![Problem {
                key: "(file)".to_owned(),
                reason: format!("cannot read: {e}"),
            }],
            parse: Vec::new(),
            config: None,
        })?;
        Self::parse(path, &text, route_check)
    }

    /// Parses and validates `text`. Every problem in one pass: when some lines do not parse,
    /// the rest is still validated (a bad URL shows beside a misspelt key, not after it is
    /// fixed), leaving out problems in a table that lost a line, which may be that loss's doing.
    pub fn parse(path: &Path, text: &str, route_check: RouteCheck) -> Result<Config, ConfigError> {
        let (mut config, parse) = match parse_all(text) {
            Ok(config) => (config, Vec::new()),
            Err(Unparsed {
                problems,
                rest: Some(rest),
            }) => {
                let (mut config, blanked) = *rest;
                let mut from_env = overlay_env(&mut config);
                from_env.extend(log_defaults(&mut config));
                // `check` still reads the secrets that are well formed.
                config.secrets = config.typed_secrets();
                let mut validation = config.validate(route_check);
                validation.retain(|p| !blanked.iter().any(|b| beside(&p.key, b)));
                name_variables(&mut validation);
                validation.splice(0..0, from_env);
                return Err(ConfigError {
                    file: path.to_owned(),
                    parse: problems,
                    problems: validation,
                    config: Some(Box::new(config)),
                });
            }
            Err(Unparsed { problems, rest: None }) => {
                return Err(ConfigError {
                    file: path.to_owned(),
                    parse: problems,
                    problems: Vec::new(),
                    config: None,
                })
            }
        };
        let mut from_env = overlay_env(&mut config);
        from_env.extend(log_defaults(&mut config));
        let mut problems = config.validate(route_check);
        name_variables(&mut problems);
        problems.splice(0..0, from_env);
        debug_assert!(parse.is_empty());
        if problems.is_empty() {
            config.secrets = config.typed_secrets();
            Ok(config)
        } else {
            config.secrets = config.typed_secrets();
            Err(ConfigError {
                file: path.to_owned(),
                problems,
                parse,
                config: Some(Box::new(config)),
            })
        }
    }
}

/// In the environment mode ([`super::env`]), its variables set on `config`; the problems of
/// those that cannot be read.
fn overlay_env(config: &mut Config) -> Vec<Problem> {
    super::env::active().map_or_else(Vec::new, |env| env.overlay(config))
}

/// `agent.log_stream` and `agent.log_format` from [`super::LOG_STREAM_VAR`] and
/// [`super::LOG_FORMAT_VAR`] where the file leaves them out (in either mode: the image sets the
/// variables for both).
fn log_defaults(config: &mut Config) -> Vec<Problem> {
    let stream = std::env::var_os(super::LOG_STREAM_VAR);
    let format = std::env::var_os(super::LOG_FORMAT_VAR);
    config.agent.log_defaults(stream.as_deref(), format.as_deref())
}

/// In the environment mode, each validation problem names the variable behind its key.
fn name_variables(problems: &mut [Problem]) {
    if let Some(env) = super::env::active() {
        env.name_variables(problems);
    }
}

/// Whether validation problem `key` is in the table that lost the set-aside statement
/// `blanked` (or is that statement's own key).
fn beside(key: &str, blanked: &str) -> bool {
    match blanked.rsplit_once('.') {
        Some((table, _)) => {
            key == table || key.starts_with(&format!("{table}.")) || key.starts_with(&format!("{table}["))
        }
        None => key == blanked || key.starts_with(&format!("{blanked}.")) || key.starts_with(&format!("{blanked}[")),
    }
}

/// What [`parse_all`] found wrong, and what parsed once the bad statements were set aside
/// (with their keys), when that much is still TOML.
struct Unparsed {
    problems: Vec<ParseProblem>,
    rest: Option<Box<(Config, Vec<String>)>>,
}

/// `--token=VALUE` with the value replaced: the parser quotes an offending value in some
/// errors (`invalid type: string "--token=…", expected a sequence` for `extra_args`).
fn redact_token_args(reason: &str) -> String {
    let mut out = String::with_capacity(reason.len());
    let mut rest = reason;
    while let Some(i) = rest.find("--token") {
        let (before, after) = rest.split_at(i);
        out.push_str(before);
        let stop = |c: char| c == '"' || c == '`' || c == ',' || c == '\\' || c.is_whitespace();
        let flag_end = after.find(|c: char| c == '=' || stop(c)).unwrap_or(after.len());
        out.push_str(&after[..flag_end]);
        let mut tail = &after[flag_end..];
        if let Some(value) = tail.strip_prefix('=') {
            out.push_str("=[redacted]");
            tail = &value[value.find(stop).unwrap_or(value.len())..];
        }
        rest = tail;
    }
    out.push_str(rest);
    out
}

/// Parser errors reported per `check` run, at most. A file with more is not worth listing.
const MAX_PARSE_PROBLEMS: usize = 50;

/// Deserializes `text`, collecting every parser error rather than the first.
///
/// serde stops at the first error, so after each one the offending statement (a `key = value`
/// line or a `[table]`) is blanked with spaces and the text parsed again. Blanking keeps every
/// byte offset, so later positions are still those of the original file. The loop stops at the
/// first error it cannot attribute to a statement, or when blanking left text that is no longer
/// TOML (that error would be ours, not the file's).
fn parse_all(text: &str) -> Result<Config, Unparsed> {
    let mut scratch = text.to_owned();
    let mut problems: Vec<ParseProblem> = Vec::new();
    let mut blanked: Vec<String> = Vec::new();
    let stop = |problems| Err(Unparsed { problems, rest: None });
    loop {
        let e = match toml::from_str::<Config>(&scratch) {
            Ok(config) if problems.is_empty() => return Ok(config),
            Ok(config) => {
                return Err(Unparsed {
                    problems,
                    rest: Some(Box::new((config, blanked))),
                })
            }
            Err(e) => e,
        };
        let doc = toml_edit::ImDocument::parse(scratch.as_str()).ok();
        if doc.is_none() && !problems.is_empty() {
            return stop(problems);
        }
        let located = match (&doc, e.span()) {
            (Some(doc), Some(span)) => locate(doc.as_table(), span.start),
            _ => None,
        };
        // Syntax errors come as several lines ("invalid table header\nexpected ..."): keep one.
        let mut reason = redact_token_args(&e.message().trim().replace('\n', "; "));
        if reason.is_empty() {
            // toml's parser has no words for some inputs (a lone carriage return).
            reason = "invalid TOML syntax here".to_owned();
        }
        // `[secrets.x]` with a bad `source` line blanked now lacks `source`: that is our doing.
        let consequence = match (&located, reason.strip_prefix("missing field `")) {
            (Some(l), Some(rest)) => {
                let field = rest.trim_end_matches('`');
                blanked.contains(&join_key(&l.key, field))
            }
            _ => false,
        };
        if !consequence {
            problems.push(ParseProblem {
                key: located.as_ref().map(|l| l.key.clone()),
                position: e.span().map(|s| line_column(text, s.start)),
                reason,
            });
        }
        let Some(Located {
            key,
            statement: Some(statement),
        }) = located
        else {
            return stop(problems);
        };
        if problems.len() >= MAX_PARSE_PROBLEMS || !blank(&mut scratch, statement) {
            return stop(problems);
        }
        blanked.push(key);
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(super) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = before.matches('\n').count() + 1;
    (line, before[line_start..].chars().count() + 1)
}

/// Replaces `range` of `text` with spaces, keeping line breaks. False if nothing changed.
fn blank(text: &mut String, range: std::ops::Range<usize>) -> bool {
    let mut bytes = std::mem::take(text).into_bytes();
    let mut changed = false;
    for b in bytes.get_mut(range).into_iter().flatten() {
        if !matches!(*b, b'\n' | b'\r' | b' ') {
            *b = b' ';
            changed = true;
        }
    }
    // Spans start and end on character boundaries, so this only fails on a parser bug.
    match String::from_utf8(bytes) {
        Ok(s) => *text = s,
        Err(_) => changed = false,
    }
    changed
}

/// `prefix.key`, quoting keys that are not bare TOML keys (`routes.hosts."a.example.com"`).
fn join_key(prefix: &str, key: &str) -> String {
    let bare = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    match (prefix.is_empty(), bare) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{key:?}"),
        (false, true) => format!("{prefix}.{key}"),
        (false, false) => format!("{prefix}.{key:?}"),
    }
}

/// Where a parser error falls: the innermost key, and the statement to blank to get past it.
#[derive(Debug)]
struct Located {
    key: String,
    /// `None` where blanking would change the meaning of what follows (an `[[array]]` element
    /// renumbers the ones after it; a dotted key leaves its prefix behind).
    statement: Option<std::ops::Range<usize>>,
}

fn contains(span: &Option<std::ops::Range<usize>>, pos: usize) -> bool {
    span.as_ref().is_some_and(|s| s.contains(&pos) || s.start == pos)
}

/// Walks every entry of `table`; deeper matches overwrite shallower ones.
fn locate(table: &toml_edit::Table, pos: usize) -> Option<Located> {
    let mut found = None;
    locate_in(table, "", None, true, pos, &mut found);
    found
}

fn locate_in(
    table: &dyn toml_edit::TableLike,
    prefix: &str,
    statement: Option<&std::ops::Range<usize>>,
    lines: bool,
    pos: usize,
    found: &mut Option<Located>,
) {
    use toml_edit::{Item, Value};
    for (name, _) in table.iter() {
        let Some((key, item)) = table.get_key_value(name) else {
            continue;
        };
        let path = join_key(prefix, name);
        let entry = match (key.span(), item.span()) {
            (Some(k), Some(v)) if v.end > k.start => Some(k.start..v.end),
            (k, _) => k,
        };
        let own = match item {
            // In a [table] (or at the top), `key = value` is a line of its own.
            Item::Value(_) if lines => entry.clone(),
            Item::Value(_) => statement.cloned(),
            // A [table]'s span runs from its header to its last value. Implicit parents
            // (`[secrets]` of `[secrets.x]`) and dotted tables have none.
            Item::Table(t) if !t.is_dotted() => t.span(),
            Item::Table(_) | Item::ArrayOfTables(_) | Item::None => None,
        };
        if contains(&entry, pos) || (matches!(item, Item::Table(_)) && contains(&own, pos)) {
            *found = Some(Located {
                key: path.clone(),
                statement: own.clone(),
            });
        }
        match item {
            Item::Table(t) => locate_in(t, &path, own.as_ref(), !t.is_dotted(), pos, found),
            Item::ArrayOfTables(tables) => {
                for (i, t) in tables.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    if contains(&t.span(), pos) {
                        *found = Some(Located {
                            key: path.clone(),
                            statement: None,
                        });
                    }
                    locate_in(t, &path, None, true, pos, found);
                }
            }
            Item::Value(Value::InlineTable(t)) => locate_in(t, &path, own.as_ref(), false, pos, found),
            Item::Value(Value::Array(values)) => {
                for (i, v) in values.iter().enumerate() {
                    let path = format!("{path}[{i}]");
                    if contains(&v.span(), pos) {
                        *found = Some(Located {
                            key: path.clone(),
                            statement: own.clone(),
                        });
                    }
                    if let Value::InlineTable(t) = v {
                        locate_in(t, &path, own.as_ref(), false, pos, found);
                    }
                }
            }
            Item::Value(_) | Item::None => {}
        }
    }
}
