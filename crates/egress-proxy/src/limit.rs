//! The cap on concurrent connections of one workspace.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Counts the open proxy connections of one workspace against a limit.
///
/// Cloning shares the count. Take a permit per accepted stream and hold it while the
/// connection lives; [`Proxy::serve_limited`](crate::Proxy::serve_limited) does both, and
/// answers a stream over the limit with a `429` that names the limit:
///
/// ```no_run
/// # async fn accept_loop(
/// #     listener: tokio::net::UnixListener,
/// #     proxy: std::sync::Arc<conductor_egress_proxy::Proxy>,
/// #     gate: std::sync::Arc<dyn conductor_egress_proxy::Gate>,
/// # ) {
/// use conductor_egress_proxy::ConnectionLimiter;
///
/// let limiter = ConnectionLimiter::new(256);
/// while let Ok((stream, _)) = listener.accept().await {
///     let (proxy, gate, limiter) = (proxy.clone(), gate.clone(), limiter.clone());
///     tokio::spawn(async move {
///         let event = proxy.serve_limited(stream, &*gate, &limiter).await;
///         // record `event` in the audit log
///     });
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ConnectionLimiter {
    semaphore: Arc<Semaphore>,
    limit: usize,
}

/// One open connection's place under a [`ConnectionLimiter`]; dropping it frees the place.
#[derive(Debug)]
pub struct ConnectionPermit {
    _permit: OwnedSemaphorePermit,
}

impl ConnectionLimiter {
    /// A limiter for at most `limit` concurrent connections (capped at what a tokio
    /// semaphore can count, which no real limit reaches).
    pub fn new(limit: usize) -> Self {
        let limit = limit.min(Semaphore::MAX_PERMITS);
        Self {
            semaphore: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }

    /// The limit this limiter was made with.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// How many permits are held now.
    pub fn in_use(&self) -> usize {
        self.limit - self.semaphore.available_permits()
    }

    /// A permit, or `None` at once when `limit` are already held.
    pub fn try_acquire(&self) -> Option<ConnectionPermit> {
        let permit = self.semaphore.clone().try_acquire_owned().ok()?;
        Some(ConnectionPermit { _permit: permit })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_past_the_limit_and_frees_on_drop() {
        let limiter = ConnectionLimiter::new(2);
        let a = limiter.try_acquire().expect("first permit");
        let b = limiter.clone().try_acquire().expect("second permit, through a clone");
        assert_eq!(limiter.in_use(), 2);
        assert!(limiter.try_acquire().is_none());
        drop(a);
        assert_eq!(limiter.in_use(), 1);
        let _c = limiter.try_acquire().expect("a freed place is reusable");
        drop(b);
        assert_eq!(limiter.limit(), 2);
    }

    #[test]
    fn a_zero_limit_refuses_everything() {
        let limiter = ConnectionLimiter::new(0);
        assert!(limiter.try_acquire().is_none());
        assert_eq!(limiter.in_use(), 0);
    }
}
