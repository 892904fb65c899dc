//! What a server reports through the health service (`srpc.health`): a
//! status per service name, `""` for the whole server.
//!
//! ```text
//! Server::health().set("Demo", NotServing) ─┐
//! serve's shutdown fires: everything NotServing, for good
//!                                           ▼
//!        statuses (a watch channel) ◄── Check: read one
//!                                   ◄── Watch: wait until one changes
//! ```
//!
//! Every service the router serves, and `""`, start as `Serving`. Once the
//! server drains, every status is `NotServing` and stays so (as gRPC's
//! `enterShutdown`): a later `set` cannot make a draining server look
//! ready.
//!
//! Not here: the wire side (rpc-core `health.rs`), answering the calls
//! (`layers.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use rpc_core::health::HealthStatus;
use rpc_core::Status;
use tokio::sync::watch;

/// The server's health statuses; cheap to clone (one shared record).
#[derive(Clone, Debug)]
pub struct Health {
    statuses: Arc<watch::Sender<Statuses>>,
}

#[derive(Debug, Default)]
struct Statuses {
    by_service: HashMap<String, HealthStatus>,
    /// Set when the server drains: every status is NotServing from then on.
    draining: bool,
}

impl Health {
    /// `""` and every name in `services`, all serving.
    pub(crate) fn new(services: impl IntoIterator<Item = String>) -> Self {
        let mut by_service: HashMap<String, HealthStatus> = services
            .into_iter()
            .map(|name| (name, HealthStatus::Serving))
            .collect();
        by_service.insert(String::new(), HealthStatus::Serving);
        Health {
            statuses: Arc::new(watch::Sender::new(Statuses {
                by_service,
                draining: false,
            })),
        }
    }

    /// Sets `service`'s status (`""`: the whole server), adding the name
    /// if it is new. Ignored once the server drains.
    pub fn set(&self, service: &str, status: HealthStatus) {
        self.statuses.send_if_modified(|s| {
            if s.draining || s.by_service.get(service) == Some(&status) {
                return false;
            }
            s.by_service.insert(service.to_owned(), status);
            true
        });
    }

    /// `service`'s status, `None` for a name the server does not know.
    pub fn get(&self, service: &str) -> Option<HealthStatus> {
        self.statuses.borrow().by_service.get(service).copied()
    }

    /// The server drains: every status becomes `NotServing`, for good.
    pub(crate) fn drain(&self) {
        self.statuses.send_modify(|s| {
            s.draining = true;
            for status in s.by_service.values_mut() {
                *status = HealthStatus::NotServing;
            }
        });
    }

    /// What `srpc.health.Check` answers.
    pub(crate) fn check(&self, service: &str) -> Result<HealthStatus, Status> {
        self.get(service).ok_or_else(|| unknown(service))
    }

    /// What `srpc.health.Watch` answers: `service`'s status once it is not
    /// `seen` (at once without one). The call's deadline bounds the wait.
    pub(crate) async fn watch(
        &self,
        service: &str,
        seen: Option<HealthStatus>,
    ) -> Result<HealthStatus, Status> {
        let mut changes = self.statuses.subscribe();
        let current = changes
            .wait_for(|s| s.by_service.get(service).copied() != seen)
            .await
            .map_err(|_| Status::unavailable("the server is gone"))?;
        current
            .by_service
            .get(service)
            .copied()
            .ok_or_else(|| unknown(service))
    }
}

fn unknown(service: &str) -> Status {
    let shown = rpc_core::error::escape_peer_text(service, 128);
    Status::not_found(format!("no service {shown:?} on this server"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn statuses_start_serving_and_draining_wins_for_good() {
        let health = Health::new(["Demo".to_owned()]);
        assert_eq!(health.check(""), Ok(HealthStatus::Serving));
        assert_eq!(health.check("Demo"), Ok(HealthStatus::Serving));
        let err = health.check("Other").unwrap_err();
        assert_eq!(err.code, rpc_core::StatusCode::NotFound);
        health.set("Demo", HealthStatus::NotServing);
        assert_eq!(health.check("Demo"), Ok(HealthStatus::NotServing));
        health.set("Other", HealthStatus::Serving);
        assert_eq!(health.check("Other"), Ok(HealthStatus::Serving));
        health.drain();
        health.set("Demo", HealthStatus::Serving);
        for name in ["", "Demo", "Other"] {
            assert_eq!(health.check(name), Ok(HealthStatus::NotServing), "{name}");
        }
    }

    #[tokio::test]
    async fn watch_answers_when_the_status_changes() {
        let health = Health::new(["Demo".to_owned()]);
        assert_eq!(health.watch("Demo", None).await, Ok(HealthStatus::Serving));
        let waiting = tokio::spawn({
            let health = health.clone();
            async move { health.watch("Demo", Some(HealthStatus::Serving)).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        health.set("Demo", HealthStatus::NotServing);
        assert_eq!(waiting.await.unwrap(), Ok(HealthStatus::NotServing));
        let err = health.watch("Nope", Some(HealthStatus::Serving)).await;
        assert_eq!(err.unwrap_err().code, rpc_core::StatusCode::NotFound);
    }
}
