//! The store an election runs on, as the state machine in `election/mod.rs` sees it: four
//! operations, whatever the backend. etcd (`etcd.rs`) and the Kubernetes Lease API
//! (`kubernetes.rs`) each map them onto their own primitives; the campaign, the fence by time,
//! the phases, outcomes, metrics and `/status` exist once, in the state machine.
//!
//! - [`Store::acquire`]: take the key if nobody holds it (etcd: grant a lease, create the key
//!   under it if absent; Kubernetes: create the Lease, or update it by `resourceVersion` once the
//!   holder's renewals stopped for a lease duration by our clock).
//! - [`Store::renew`]: extend our hold (etcd: keepalive; Kubernetes: update `renewTime`).
//! - [`Store::read`]: who holds the key now (`None`: free, campaign).
//! - [`Store::release`]: give the hold up at once (etcd: revoke; Kubernetes: clear the holder).

use std::time::Duration;

use super::etcd::{self, EtcdClient, EtcdError};
pub use super::hold::{Holder, Lease};
use super::kubernetes::{self, KubeError, LeaseClient};

/// The backend: one of the two clients.
pub enum Store {
    Etcd(EtcdClient),
    /// Boxed: it keeps the last Lease it saw, much larger than the etcd client.
    Kubernetes(Box<LeaseClient>),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
}

/// What a renewal found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Renewal {
    /// Extended: it lasts `ttl` from when the renewal was sent.
    Renewed(Duration),
    /// The hold is gone (expired, deleted, taken): why.
    Lost(String),
}

impl Store {
    /// `backend` in `/status` and the metrics.
    pub fn backend(&self) -> &'static str {
        match self {
            Store::Etcd(_) => "etcd",
            Store::Kubernetes(_) => "kubernetes",
        }
    }

    /// One attempt at the key: `Ok(Ok(lease))` won, `Ok(Err(holder))` held by another (or
    /// taken meanwhile: `None`). A hold left behind by a failed attempt is given back.
    pub async fn acquire(
        &self,
        key: &str,
        me: &str,
        ttl: Duration,
        timeout: Duration,
    ) -> Result<Result<Lease, Option<Holder>>, StoreError> {
        match self {
            Store::Etcd(c) => etcd_acquire(c, key, me, ttl, timeout).await,
            // The client was built with this node's name and ttl; the key is its Lease.
            Store::Kubernetes(c) => Ok(c
                .acquire(timeout)
                .await?
                .map(|(id, ttl)| Lease { id, ttl })
                .map_err(|h| h.map(from_kube))),
        }
    }

    pub async fn renew(&self, lease: i64, timeout: Duration) -> Result<Renewal, StoreError> {
        match self {
            Store::Etcd(c) => match c.keepalive(lease, timeout).await {
                Ok(Some(ttl)) => Ok(Renewal::Renewed(ttl)),
                Ok(None) => Ok(Renewal::Lost("the lease expired on the server".into())),
                Err(EtcdError::Refused {
                    code: etcd::CODE_NOT_FOUND,
                    message,
                    ..
                }) => Ok(Renewal::Lost(format!("the lease is gone: {message}"))),
                Err(e) => Err(e.into()),
            },
            Store::Kubernetes(c) => Ok(match c.renew(lease, timeout).await? {
                Ok(ttl) => Renewal::Renewed(ttl),
                Err(why) => Renewal::Lost(why),
            }),
        }
    }

    pub async fn read(&self, key: &str, timeout: Duration) -> Result<Option<Holder>, StoreError> {
        match self {
            Store::Etcd(c) => Ok(c.get(key, timeout).await?),
            Store::Kubernetes(c) => Ok(c.read(timeout).await?.map(from_kube)),
        }
    }

    /// Gives the hold up (a hold that is already gone is not an error).
    pub async fn release(&self, lease: i64, timeout: Duration) -> Result<(), StoreError> {
        match self {
            Store::Etcd(c) => Ok(c.revoke(lease, timeout).await?),
            Store::Kubernetes(c) => Ok(c.release(lease, timeout).await?),
        }
    }
}

fn from_kube(h: kubernetes::Holder) -> Holder {
    Holder {
        name: h.name,
        lease: i64::from(h.transitions),
    }
}

/// etcd's recipe (`clientv3/concurrency`): grant a lease, then put the key under it only if
/// the key does not exist. The lease is revoked again when the key was not won.
async fn etcd_acquire(
    c: &EtcdClient,
    key: &str,
    me: &str,
    ttl: Duration,
    timeout: Duration,
) -> Result<Result<Lease, Option<Holder>>, StoreError> {
    let lease = c.grant(ttl, timeout).await?;
    if lease.ttl < ttl {
        // Never expected (etcd only raises TTLs), but the fence must use what was granted.
        tracing::warn!(
            asked_s = ttl.as_secs(),
            granted_s = lease.ttl.as_secs(),
            "etcd granted a shorter lease than asked: {}s instead of {}s",
            lease.ttl.as_secs(),
            ttl.as_secs()
        );
    }
    match c.campaign(key, me, lease.id, timeout).await {
        Ok(Ok(())) => Ok(Ok(Lease {
            id: lease.id,
            ttl: lease.ttl,
        })),
        Ok(Err(holder)) => {
            let _ = c.revoke(lease.id, timeout).await;
            Ok(Err(holder))
        }
        Err(e) => {
            // The transaction's outcome is unknown: if it did put the key, revoking the lease
            // deletes it again. If the revoke fails too, the key expires within ttl and nobody
            // is active meanwhile, which is the safe side.
            let _ = c.revoke(lease.id, timeout).await;
            Err(e.into())
        }
    }
}
