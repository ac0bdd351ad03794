//! Compiled `HTTPRouteMatch`es and the per-hostname lists that order them by Gateway API
//! precedence.
//!
//! Precedence is decided **per match**, not per rule (Gateway API v1, `HTTPRouteRule`): across
//! every rule that applies to a hostname, the winning match is the one with
//!   1. an `Exact` path match,
//!   2. then a `RegularExpression` path match (implementation-specific in the spec; longer
//!      pattern first),
//!   3. then the `PathPrefix` match with the most characters,
//!   4. then a method match,
//!   5. then the most header matches,
//!   6. then the most query parameter matches,
//!   7. then the earliest rule (routes in configuration order, rules in list order).
//!
//! Everything is decided when a table is built: regexes are compiled, lists are sorted, exact
//! paths are hashed. A request only walks a sorted list and stops at the first match whose
//! conditions hold.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderMap, HeaderName, Method};
use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

use crate::config::route_spec::{MatchSpec, PathMatchKind, PathMatchSpec, ValueMatchKind, ValueMatchSpec};
use crate::config::Problem;
use crate::routing::error::RuleError;

/// Longest path, header or query value accepted in a match (Gateway API's own limit).
const MAX_VALUE_LEN: usize = 1024;

/// Compiled size limit for one regex: a pushed config must not be able to make the agent
/// allocate without bound.
const REGEX_SIZE_LIMIT: usize = 512 * 1024;

/// The parts of a request that matching looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestHead<'a> {
    pub method: &'a Method,
    /// The path in normal form (`super::path`; the proxy normalises before it routes), still
    /// percent-encoded where it must be.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestHead<'a> {
    pub fn of<B>(req: &'a http::Request<B>) -> RequestHead<'a> {
        RequestHead {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query(),
            headers: req.headers(),
        }
    }
}

/// Compiles a regular expression that must match the **whole** input.
///
/// Syntax is the `regex` crate's (close to RE2, the dialect Gateway API names). Unicode mode is
/// off, as in RE2/Go: `\d`, `\w`, `\s` and `\b` are ASCII classes, so `\d` does not match `٣`.
/// `(?u)` turns Unicode mode back on for a group where that is wanted.
pub fn compile_anchored(pattern: &str) -> Result<Regex, RuleError> {
    if pattern.len() > MAX_VALUE_LEN {
        return Err(format!("regular expression longer than {MAX_VALUE_LEN} characters").into());
    }
    let build = |p: &str| {
        RegexBuilder::new(p)
            .unicode(false)
            .size_limit(REGEX_SIZE_LIMIT)
            .dfa_size_limit(2 * REGEX_SIZE_LIMIT)
            .build()
    };
    // Compiling the pattern on its own first proves its parentheses balance, so wrapping it in
    // `\A(?:…)\z` cannot be escaped by a pattern like `a)|(b`. As a one-pattern set: that
    // parses it the same way at a small part of the cost of a `Regex` (no literal prefilters,
    // no extra engines), and a table may hold a thousand patterns.
    RegexSetBuilder::new([pattern])
        .unicode(false)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(2 * REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("invalid regular expression {pattern:?}: {}", first_line(&e)))?;
    build(&format!(r"\A(?:{pattern})\z"))
        .map_err(|e| format!("invalid regular expression {pattern:?}: {}", first_line(&e)).into())
}

fn first_line(e: &regex::Error) -> String {
    // regex's syntax errors are multi-line with a caret diagram; the last line says what is wrong.
    let text = e.to_string();
    text.lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_owned()
}

#[derive(Debug, Clone)]
pub enum PathMatcher {
    Exact(Box<str>),
    /// The prefix without its trailing `/` (`""` for `/`), matched on segment boundaries.
    Prefix(Box<str>),
    Regex(Regex),
}

impl PathMatcher {
    /// A configured path match; a path value must be in normal form.
    fn compile(p: &PathMatchSpec) -> Result<PathMatcher, RuleError> {
        match p.kind {
            PathMatchKind::Exact => check_path_value(&p.value).map(|()| PathMatcher::Exact(p.value.as_str().into())),
            PathMatchKind::PathPrefix => {
                check_path_value(&p.value).map(|()| PathMatcher::Prefix(p.value.trim_end_matches('/').into()))
            }
            PathMatchKind::RegularExpression => compile_anchored(&p.value).map(PathMatcher::Regex),
        }
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Exact(p) => path == &**p,
            PathMatcher::Prefix(p) => {
                p.is_empty() || (path.starts_with(&**p) && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
            }
            PathMatcher::Regex(re) => re.is_match(path.as_bytes()),
        }
    }

    /// `(kind rank, length)`: higher wins.
    fn rank(&self) -> (u8, usize) {
        match self {
            PathMatcher::Exact(p) => (3, p.len()),
            PathMatcher::Regex(re) => (2, re.as_str().len()),
            PathMatcher::Prefix(p) => (1, p.len()),
        }
    }
}

#[derive(Debug, Clone)]
enum ValueMatcher {
    Exact(Box<[u8]>),
    Regex(Regex),
}

impl ValueMatcher {
    fn compile(spec: &ValueMatchSpec) -> Result<ValueMatcher, RuleError> {
        if spec.value.len() > MAX_VALUE_LEN {
            return Err(format!("value longer than {MAX_VALUE_LEN} characters").into());
        }
        Ok(match spec.kind {
            ValueMatchKind::Exact => ValueMatcher::Exact(spec.value.as_bytes().into()),
            ValueMatchKind::RegularExpression => ValueMatcher::Regex(compile_anchored(&spec.value)?),
        })
    }

    fn matches(&self, value: &[u8]) -> bool {
        match self {
            ValueMatcher::Exact(v) => value == &**v,
            ValueMatcher::Regex(re) => re.is_match(value),
        }
    }
}

#[derive(Debug, Clone)]
struct HeaderCondition {
    name: HeaderName,
    value: ValueMatcher,
}

impl HeaderCondition {
    fn holds<'t>(&'t self, seen: &mut HeaderLookups<'t, '_>) -> bool {
        seen.value(&self.name).is_some_and(|v| self.value.matches(v))
    }
}

/// The request's header values, looked up once per request and shared by every condition on
/// the same name: a table that routes tenants by header tests one name many times.
pub struct HeaderLookups<'t, 'r> {
    headers: &'r HeaderMap,
    values: Vec<(&'t HeaderName, Option<Cow<'r, [u8]>>)>,
}

impl<'t, 'r> HeaderLookups<'t, 'r> {
    pub fn new(headers: &'r HeaderMap) -> Self {
        HeaderLookups {
            headers,
            values: Vec::new(),
        }
    }

    fn value(&mut self, name: &'t HeaderName) -> Option<&[u8]> {
        let i = match self.values.iter().position(|(n, _)| *n == name) {
            Some(i) => i,
            None => {
                self.values.push((name, field_value(self.headers, name)));
                self.values.len() - 1
            }
        };
        self.values[i].1.as_deref()
    }
}

/// A header's value; a repeated header is one field whose value is its lines joined by commas
/// (RFC 9110 §5.3), which is what the Gateway API spec defers to.
fn field_value<'r>(headers: &'r HeaderMap, name: &HeaderName) -> Option<Cow<'r, [u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    match values.next() {
        None => Some(Cow::Borrowed(first.as_bytes())),
        Some(second) => {
            let mut joined = first.as_bytes().to_vec();
            for v in std::iter::once(second).chain(values) {
                joined.push(b',');
                joined.extend_from_slice(v.as_bytes());
            }
            Some(Cow::Owned(joined))
        }
    }
}

#[derive(Debug, Clone)]
struct QueryCondition {
    name: Box<str>,
    value: ValueMatcher,
}

impl QueryCondition {
    fn holds(&self, query: Option<&str>) -> bool {
        query
            .and_then(|q| first_query_value(q, &self.name))
            .is_some_and(|v| self.value.matches(&v))
    }
}

/// The decoded value of the first `name=value` pair whose decoded name is `name`
/// (`application/x-www-form-urlencoded`: `+` is a space, `%XX` a byte). Gateway API leaves a
/// repeated parameter undefined and recommends the first value.
pub fn first_query_value<'q>(query: &'q str, name: &str) -> Option<Cow<'q, [u8]>> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if form_decode(k) == name.as_bytes() {
            return Some(form_decode(v));
        }
    }
    None
}

fn form_decode(s: &str) -> Cow<'_, [u8]> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(s.as_bytes());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) {
                    (Some(h), Some(l)) => {
                        // Two hex digits: the value fits a byte.
                        out.push(u8::try_from(h * 16 + l).unwrap_or(b'?'));
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(out)
}

/// Methods Gateway API's `HTTPMethod` enumerates.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// How specific a match is, in Gateway API precedence order: path kind, path length, method
/// given, header conditions, query conditions. Greater wins.
type Specificity = (u8, usize, bool, usize, usize);

/// One compiled `HTTPRouteMatch`, belonging to rule `rule` of its table.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatcher,
    method: Option<Method>,
    headers: Box<[HeaderCondition]>,
    query: Box<[QueryCondition]>,
    /// Index of the owning rule in its table.
    pub rule: usize,
    /// Tie-break: the rule's position in configuration order, then this match's position in
    /// the rule.
    order: (usize, usize),
}

impl RouteMatch {
    /// The implicit match of a rule without matches: `PathPrefix /`.
    pub fn catch_all(rule: usize, order: usize) -> RouteMatch {
        RouteMatch {
            path: PathMatcher::Prefix("".into()),
            method: None,
            headers: Box::new([]),
            query: Box::new([]),
            rule,
            order: (order, 0),
        }
    }

    /// Compiles `spec`, reporting every problem under `key`.
    pub fn compile(
        spec: &MatchSpec,
        key: &str,
        rule: usize,
        order: (usize, usize),
    ) -> Result<RouteMatch, Vec<Problem>> {
        let mut problems = Vec::new();
        let path = match spec.path.as_ref().map(PathMatcher::compile).transpose() {
            Ok(path) => path.unwrap_or(PathMatcher::Prefix("".into())),
            Err(e) => {
                problems.push(e.at(format!("{key}.path")));
                PathMatcher::Prefix("".into())
            }
        };
        let method = match spec.method.as_deref() {
            None | Some("") => None,
            Some(m) if METHODS.contains(&m) => Method::from_bytes(m.as_bytes()).ok(),
            Some(m) => {
                problems.push(Problem {
                    key: format!("{key}.method"),
                    reason: format!("{m:?} is not one of {}", METHODS.join(", ")),
                });
                None
            }
        };
        let headers = header_conditions(&spec.headers, key, &mut problems);
        let query = query_conditions(&spec.query_params, key, &mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(RouteMatch {
            path,
            method,
            headers: headers.into(),
            query: query.into(),
            rule,
            order,
        })
    }

    /// Whether this match accepts every request.
    pub fn is_catch_all(&self) -> bool {
        matches!(&self.path, PathMatcher::Prefix(p) if p.is_empty())
            && self.method.is_none()
            && self.headers.is_empty()
            && self.query.is_empty()
    }

    /// The `PathPrefix` this match matched on, for `ReplacePrefixMatch`.
    pub fn prefix(&self) -> Option<&str> {
        match &self.path {
            PathMatcher::Prefix(p) => Some(p),
            _ => None,
        }
    }

    pub fn matches(&self, req: &RequestHead<'_>) -> bool {
        self.matches_with(req, &mut HeaderLookups::new(req.headers))
    }

    fn matches_with<'t>(&'t self, req: &RequestHead<'_>, seen: &mut HeaderLookups<'t, '_>) -> bool {
        self.path.matches(req.path) && self.conditions_hold(req, seen)
    }

    /// Method, header and query conditions (everything but the path).
    fn conditions_hold<'t>(&'t self, req: &RequestHead<'_>, seen: &mut HeaderLookups<'t, '_>) -> bool {
        self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|h| h.holds(seen))
            && self.query.iter().all(|q| q.holds(req.query))
    }

    /// Sort key: smaller sorts first, i.e. wins.
    fn sort_key(&self) -> (Reverse<Specificity>, (usize, usize)) {
        let (kind, len) = self.path.rank();
        (
            Reverse((kind, len, self.method.is_some(), self.headers.len(), self.query.len())),
            self.order,
        )
    }

    /// Whether `self` takes precedence over `other` (strictly). For tests and the reference
    /// matcher used by the randomized test.
    pub fn outranks(&self, other: &RouteMatch) -> bool {
        self.sort_key() < other.sort_key()
    }
}

/// A match's header conditions. "If multiple entries specify equivalent header names, only the
/// first entry with an equivalent name MUST be considered for a match." Header names compare
/// case-insensitively.
fn header_conditions(specs: &[ValueMatchSpec], key: &str, problems: &mut Vec<Problem>) -> Vec<HeaderCondition> {
    let mut headers: Vec<HeaderCondition> = Vec::with_capacity(specs.len());
    for (i, h) in specs.iter().enumerate() {
        let k = format!("{key}.headers[{i}]");
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            problems.push(Problem {
                key: k,
                reason: format!("{:?} is not a valid header name", h.name),
            });
            continue;
        };
        match ValueMatcher::compile(h) {
            Ok(value) if !headers.iter().any(|c| c.name == name) => headers.push(HeaderCondition { name, value }),
            Ok(_) => {}
            Err(e) => problems.push(e.at(k)),
        }
    }
    headers
}

/// A match's query parameter conditions; names compare exactly, the first of a name counts.
fn query_conditions(specs: &[ValueMatchSpec], key: &str, problems: &mut Vec<Problem>) -> Vec<QueryCondition> {
    let mut query: Vec<QueryCondition> = Vec::with_capacity(specs.len());
    for (i, q) in specs.iter().enumerate() {
        let k = format!("{key}.query_params[{i}]");
        if q.name.is_empty() {
            problems.push(Problem {
                key: k,
                reason: "name must not be empty".into(),
            });
            continue;
        }
        match ValueMatcher::compile(q) {
            Ok(value) if !query.iter().any(|c| *c.name == *q.name) => query.push(QueryCondition {
                name: q.name.as_str().into(),
                value,
            }),
            Ok(_) => {}
            Err(e) => problems.push(e.at(k)),
        }
    }
    query
}

fn check_path_value(v: &str) -> Result<(), RuleError> {
    if !v.starts_with('/') {
        return Err(format!("{v:?} must start with \"/\"").into());
    }
    if v.len() > MAX_VALUE_LEN {
        return Err(format!("longer than {MAX_VALUE_LEN} characters").into());
    }
    if let Some(c) = v
        .chars()
        .find(|c| matches!(c, '?' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(format!("{v:?} contains {c:?}, which cannot appear in a request path").into());
    }
    normal_form(v)
}

/// Requests are matched in their normalised form (`super::path`), so a value is written in that
/// form too: any other spelling could never match, or would match less than it says.
pub(super) fn normal_form(v: &str) -> Result<(), RuleError> {
    match super::path::normalise(v) {
        Ok(Cow::Borrowed(_)) => Ok(()),
        Ok(Cow::Owned(normal)) => Err(format!(
            "{v:?} is not a normalised path (requests are matched and forwarded normalised): write {normal:?}"
        )
        .into()),
        Err(e) => Err(format!("{v:?} cannot be a request path: {e}").into()),
    }
}

/// The matches that apply to one hostname (or to any host), in precedence order. The path
/// kinds are kept apart because their ranks never interleave: every `Exact` outranks every
/// `RegularExpression`, which outranks every `PathPrefix`.
#[derive(Debug, Default)]
pub struct MatchList {
    /// `Exact` path matches by path, each list by precedence.
    exact: HashMap<Box<str>, Vec<usize>>,
    /// `RegularExpression` path matches by precedence.
    regex: Vec<usize>,
    /// The paths of `regex` as one set, so a request runs one automaton over its path instead
    /// of one per pattern. `None` below two patterns, or if the set would be too large. Shared
    /// with every list of the table that has the same regex matches ([`RegexSets`]).
    regex_set: Option<Arc<RegexSet>>,
    /// `PathPrefix` matches other than `/`, by the first segment of their prefix, each list by
    /// precedence: a prefix can only match paths with the same first segment.
    prefix_by_segment: HashMap<Box<str>, Vec<usize>>,
    /// `PathPrefix /` matches by precedence. Every other prefix is longer, so outranks these.
    prefix_root: Vec<usize>,
}

/// The first segment of a path or prefix (`/a/b` → `a`); `None` without a leading `/`.
fn first_segment(path: &str) -> Option<&str> {
    path.strip_prefix('/')
        .map(|rest| rest.split('/').next().unwrap_or(rest))
}

impl MatchList {
    pub fn push(&mut self, index: usize, m: &RouteMatch) {
        match &m.path {
            PathMatcher::Exact(p) => self.exact.entry(p.clone()).or_default().push(index),
            PathMatcher::Regex(_) => self.regex.push(index),
            PathMatcher::Prefix(p) => match first_segment(p) {
                Some(segment) => self.prefix_by_segment.entry(segment.into()).or_default().push(index),
                None => self.prefix_root.push(index),
            },
        }
    }

    /// Sorts, and takes the regex set from `sets` (built there once per distinct list).
    pub fn finish(&mut self, all: &[RouteMatch], sets: &mut RegexSets) -> Result<(), SetBudgetExceeded> {
        let key = |&i: &usize| all[i].sort_key();
        let lists = self.exact.values_mut().chain(self.prefix_by_segment.values_mut());
        for list in lists.chain([&mut self.regex, &mut self.prefix_root]) {
            list.sort_by_key(key);
            list.dedup();
        }
        self.regex_set = None;
        if self.regex.len() >= 2 {
            self.regex_set = sets.get(all, &self.regex)?;
        }
        Ok(())
    }

    pub fn find<'t>(&self, all: &'t [RouteMatch], req: &RequestHead<'_>) -> Option<&'t RouteMatch> {
        let seen = &mut HeaderLookups::new(req.headers);
        if !self.exact.is_empty() {
            if let Some(list) = self.exact.get(req.path) {
                if let Some(m) = list.iter().map(|&i| &all[i]).find(|m| m.matches_with(req, seen)) {
                    return Some(m);
                }
            }
        }
        if !self.regex.is_empty() {
            let found = match &self.regex_set {
                // `is_match` first: it does not allocate, and most paths match no pattern.
                Some(set) if !set.is_match(req.path.as_bytes()) => None,
                // Set indices ascend in the order the patterns were given: precedence order.
                Some(set) => set
                    .matches(req.path.as_bytes())
                    .iter()
                    .map(|k| &all[self.regex[k]])
                    .find(|m| m.conditions_hold(req, seen)),
                None => self.regex.iter().map(|&i| &all[i]).find(|m| m.matches_with(req, seen)),
            };
            if found.is_some() {
                return found;
            }
        }
        if !self.prefix_by_segment.is_empty() {
            let list = first_segment(req.path).and_then(|segment| self.prefix_by_segment.get(segment));
            if let Some(m) = list.and_then(|l| l.iter().map(|&i| &all[i]).find(|m| m.matches_with(req, seen))) {
                return Some(m);
            }
        }
        self.prefix_root
            .iter()
            .map(|&i| &all[i])
            .find(|m| m.matches_with(req, seen))
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty()
            && self.regex.is_empty()
            && self.prefix_by_segment.is_empty()
            && self.prefix_root.is_empty()
    }
}

/// The regex sets of one table, one per distinct list of regex matches: every hostname of a
/// rule has the same list, and a set is as large as its patterns together, so building one per
/// hostname multiplied a table's memory by its hostnames. Counts the patterns compiled into
/// sets against a budget, checked before each set is built.
#[derive(Debug)]
pub struct RegexSets {
    built: HashMap<Box<[usize]>, Option<Arc<RegexSet>>>,
    /// Patterns that may still go into new sets.
    budget: usize,
}

/// A table's regex matches would compile into more set entries than its budget allows.
#[derive(Debug, Clone, Copy)]
pub struct SetBudgetExceeded {
    /// The rule of the first match in the set that did not fit.
    pub rule: usize,
}

impl RegexSets {
    /// Sets for one table, at most `budget` patterns in all.
    pub fn new(budget: usize) -> RegexSets {
        RegexSets {
            built: HashMap::new(),
            budget,
        }
    }

    fn get(&mut self, all: &[RouteMatch], regex: &[usize]) -> Result<Option<Arc<RegexSet>>, SetBudgetExceeded> {
        if let Some(set) = self.built.get(regex) {
            return Ok(set.clone());
        }
        self.budget = self.budget.checked_sub(regex.len()).ok_or_else(|| SetBudgetExceeded {
            rule: regex.first().map_or(0, |&i| all[i].rule),
        })?;
        let patterns = regex.iter().filter_map(|&i| match &all[i].path {
            PathMatcher::Regex(re) => Some(re.as_str()),
            _ => None,
        });
        let set = RegexSetBuilder::new(patterns)
            .unicode(false)
            .size_limit(16 * REGEX_SIZE_LIMIT)
            .dfa_size_limit(16 * REGEX_SIZE_LIMIT)
            .build()
            .ok()
            .map(Arc::new);
        self.built.insert(regex.into(), set.clone());
        Ok(set)
    }
}
