//! Where a table looks a request's host up: hostname → the matches that apply to it, for one
//! scope of rules (the rules without listeners, or the rules attached to one listener).
//!
//! A table with listeners keeps the rules that name no listener in one index shared by every
//! listener, not a copy per listener (which made a table of n rules and n listeners cost n²),
//! and a request searches its listener's index and the shared one together.

use std::collections::HashMap;

use crate::config::{ListenerSpec, Problem};
use crate::routing::matching::{RegexSets, SetBudgetExceeded};
use crate::routing::rule_source::normalise_hostname;
use crate::routing::{MatchList, RequestHead, RouteMatch};

/// Hostname → matches, for the rules of one scope.
#[derive(Debug, Default)]
pub(crate) struct HostIndex {
    /// Lower-case exact hostname → its matches in precedence order.
    exact: HashMap<Box<str>, MatchList>,
    /// `*.suffix` hostnames by their ".suffix".
    wildcard: HashMap<Box<str>, MatchList>,
    /// Matches of rules without hostnames: they apply to any host, after the hostname's own.
    any_host: MatchList,
}

impl HostIndex {
    pub(crate) fn push(&mut self, mi: usize, m: &RouteMatch, hostnames: &[String]) {
        if hostnames.is_empty() {
            self.any_host.push(mi, m);
        }
        for h in hostnames {
            match h.strip_prefix('*') {
                Some(suffix) => self.wildcard.entry(suffix.into()).or_default().push(mi, m),
                None => self.exact.entry(h.as_str().into()).or_default().push(mi, m),
            }
        }
    }

    /// Sorts every list; lists with the same regex matches share one compiled set.
    pub(crate) fn finish(&mut self, all: &[RouteMatch], sets: &mut RegexSets) -> Result<(), SetBudgetExceeded> {
        let lists = self.exact.values_mut().chain(self.wildcard.values_mut());
        for list in lists.chain([&mut self.any_host]) {
            list.finish(all, sets)?;
        }
        Ok(())
    }
}

/// The winning match for `host` across `scopes`. Gateway API's hostname precedence comes
/// first: the exact hostname's matches, then each matching wildcard's (longest suffix first),
/// then those of rules without hostnames; within one of these, the match that outranks the
/// others across every scope, of those whose conditions hold.
pub(crate) fn find<'t>(
    scopes: &[&HostIndex],
    all: &'t [RouteMatch],
    host: &str,
    req: &RequestHead<'_>,
) -> Option<&'t RouteMatch> {
    let best = |lists: &mut dyn Iterator<Item = &MatchList>| {
        lists
            .filter_map(|l| l.find(all, req))
            .reduce(|a, b| if b.outranks(a) { b } else { a })
    };
    if let Some(m) = best(&mut scopes.iter().filter_map(|s| s.exact.get(host))) {
        return Some(m);
    }
    if scopes.iter().any(|s| !s.wildcard.is_empty()) {
        // A wildcard matches one or more labels, never the apex itself: the candidates are the
        // host's proper suffixes that start at a dot, the longest (leftmost dot) first.
        let dots = host.bytes().enumerate().skip(1).filter(|&(_, b)| b == b'.');
        for (i, _) in dots {
            let suffix = &host[i..];
            if let Some(m) = best(&mut scopes.iter().filter_map(|s| s.wildcard.get(suffix))) {
                return Some(m);
            }
        }
    }
    best(&mut scopes.iter().map(|s| &s.any_host))
}

/// A Gateway listener as a scope of rules (docs/routing.md, "Listener scopes").
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) name: Box<str>,
    /// Lower-case exact name, `*.suffix`, or `None` for a listener without a hostname.
    pub(crate) hostname: Option<Box<str>>,
    /// The rules that name this listener; those that name none are in the table's own index.
    pub(crate) index: HostIndex,
}

impl Listener {
    /// How specifically this listener matches `host`: exact above any wildcard, a longer
    /// wildcard above a shorter one, a hostname-less listener last. `None`: no match.
    pub(crate) fn specificity(&self, host: &str) -> Option<(u8, usize)> {
        match self.hostname.as_deref() {
            None => Some((0, 0)),
            Some(h) => match h.strip_prefix('*') {
                Some(suffix) => (host.len() > suffix.len() && host.ends_with(suffix)).then_some((1, suffix.len())),
                None => (h == host).then_some((2, h.len())),
            },
        }
    }
}

/// The listeners of a table, each with an empty index; every problem goes to `problems`.
pub(crate) fn compile_listeners(specs: &[ListenerSpec], problems: &mut Vec<Problem>) -> Vec<Listener> {
    let mut out: Vec<Listener> = Vec::new();
    for (i, l) in specs.iter().enumerate() {
        let key = format!("listeners[{i}]");
        let hostname = match l.hostname.as_deref().map(normalise_hostname).transpose() {
            Ok(h) => h.map(String::into_boxed_str),
            Err(e) => {
                problems.push(e.at(format!("{key}.hostname")));
                None
            }
        };
        if l.name.is_empty() || out.iter().any(|seen| *seen.name == *l.name) {
            problems.push(Problem {
                key: format!("{key}.name"),
                reason: format!("listener name {:?} is empty or given twice", l.name),
            });
        }
        out.push(Listener {
            name: l.name.as_str().into(),
            hostname,
            index: HostIndex::default(),
        });
    }
    out
}
