//! A hold on the election's key, as every store reports it: who holds the key ([`Holder`]) and
//! the hold this node won ([`Lease`]). Its own file so the etcd client and the store above it
//! share one definition.

use std::time::Duration;

/// Who holds the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's host name.
    pub name: String,
    /// Which hold: etcd's lease ID, or the Lease's `leaseTransitions` at its acquisition.
    pub lease: i64,
}

/// A hold this node won.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// What [`Holder::lease`] reads while this hold lasts.
    pub id: i64,
    /// The hold's duration on the server (etcd may grant more than asked).
    pub ttl: Duration,
}
