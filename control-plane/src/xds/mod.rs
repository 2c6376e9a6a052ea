//! The xDS server: the desired state rendered as Envoy v3 resources and
//! streamed to data-plane nodes, Envoys and proxyless gRPC clients.
//!
//! - [`resources`]: encoded, content-versioned resources and per-group views.
//! - [`translate`]: desired state → views, once per revision.
//! - [`sotw`], [`delta`]: the two stream protocols, one task per stream.
//! - [`service`]: ADS and per-type gRPC services; [`csds`]: client status.
//! - [`registry`]: connected nodes and what they ACKed or NACKed.
//!
//! A revision reaches nodes like this: the state service publishes a
//! snapshot; [`spawn_translator`] renders it once; each stream task wakes
//! on the new rendering (latest wins, so a slow node skips intermediate
//! ones), compares it with what its client has, and sends the difference.

pub mod csds;
pub mod delta;
pub mod grpc;
pub mod registry;
pub mod resources;
pub mod service;
pub mod sotw;
pub mod stream;
pub mod translate;

use std::sync::Arc;

use tokio::sync::watch;

use crate::state::StateService;
use resources::XdsSnapshot;

/// Renders every new desired-state snapshot into an xDS snapshot, off the
/// async workers, and publishes it (latest value wins).
pub fn spawn_translator(state: &StateService) -> watch::Receiver<Arc<XdsSnapshot>> {
    let mut desired = state.subscribe();
    let first = desired.borrow_and_update().clone();
    let mut translator = translate::Translator::default();
    let (tx, rx) = watch::channel(Arc::new(translator.render(&first.state, first.revision.0)));
    tokio::spawn(async move {
        while desired.changed().await.is_ok() {
            let snap = desired.borrow_and_update().clone();
            let mut t = std::mem::take(&mut translator);
            let rendered = tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                let out = t.render(&snap.state, snap.revision.0);
                let took = started.elapsed();
                if took > std::time::Duration::from_millis(10) {
                    tracing::info!(
                        revision = snap.revision.0,
                        ms = took.as_millis() as u64,
                        "slow xDS rendering"
                    );
                }
                (out, t)
            })
            .await;
            match rendered {
                Ok((r, t)) => {
                    translator = t;
                    tx.send_replace(Arc::new(r));
                }
                Err(e) => tracing::error!(error = %e, "translating the desired state failed"),
            }
        }
    });
    rx
}
