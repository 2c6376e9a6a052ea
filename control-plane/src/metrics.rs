//! Prometheus metrics of the control plane, served at `/metrics` on the
//! admin listener.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of an admin request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route template, e.g. `/api/v1/resources/{kind}`.
    pub route: String,
    /// HTTP method.
    pub method: String,
    /// Response status code.
    pub status: u16,
}

/// Labels of a write.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// `apply`, `delete` or `rollback`.
    pub operation: String,
    /// `committed`, `unchanged`, `dry_run`, `rejected`.
    pub result: String,
}

/// Labels of the per-kind document count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The kind.
    pub kind: String,
}

/// Labels of xDS stream metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `ads` or a per-type service (`lds`, `cds`, ...).
    pub service: String,
    /// `sotw` or `delta`.
    pub variant: String,
}

/// Labels of per-type xDS metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeLabels {
    /// `cds`, `eds`, `lds`, `rds`, `sds`.
    pub r#type: String,
}

/// Every metric of the control plane.
pub struct Metrics {
    registry: Registry,
    /// Admin API requests.
    pub requests: Family<RequestLabels, Counter>,
    /// Writes to the desired state by result.
    pub writes: Family<WriteLabels, Counter>,
    /// Time to validate and commit a write.
    pub write_seconds: Histogram,
    /// The current revision.
    pub revision: Gauge,
    /// Documents per kind.
    pub resources: Family<KindLabels, Gauge>,
    /// Connected xDS streams.
    pub xds_streams: Family<StreamLabels, Gauge>,
    /// xDS responses sent.
    pub xds_pushes: Family<TypeLabels, Counter>,
    /// xDS NACKs received.
    pub xds_nacks: Family<TypeLabels, Counter>,
    /// Time from sending a response to its ACK.
    pub xds_push_to_ack_seconds: Family<TypeLabels, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("portico");
        let requests = Family::<RequestLabels, Counter>::default();
        let writes = Family::<WriteLabels, Counter>::default();
        let write_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let revision = Gauge::default();
        let resources = Family::<KindLabels, Gauge>::default();
        registry.register("admin_requests", "Admin API requests", requests.clone());
        registry.register(
            "state_writes",
            "Writes to the desired state",
            writes.clone(),
        );
        registry.register(
            "state_write_seconds",
            "Time to validate and commit a write",
            write_seconds.clone(),
        );
        registry.register(
            "state_revision",
            "Current desired-state revision",
            revision.clone(),
        );
        registry.register(
            "state_documents",
            "Documents in the desired state",
            resources.clone(),
        );
        let xds_streams = Family::<StreamLabels, Gauge>::default();
        let xds_pushes = Family::<TypeLabels, Counter>::default();
        let xds_nacks = Family::<TypeLabels, Counter>::default();
        let xds_push_to_ack_seconds = Family::<TypeLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))) as fn() -> Histogram,
        );
        registry.register("xds_streams", "Connected xDS streams", xds_streams.clone());
        registry.register("xds_pushes", "xDS responses sent", xds_pushes.clone());
        registry.register("xds_nacks", "xDS NACKs received", xds_nacks.clone());
        registry.register(
            "xds_push_to_ack_seconds",
            "Time from an xDS response to its ACK",
            xds_push_to_ack_seconds.clone(),
        );
        Metrics {
            registry,
            requests,
            writes,
            write_seconds,
            revision,
            resources,
            xds_streams,
            xds_pushes,
            xds_nacks,
            xds_push_to_ack_seconds,
        }
    }
}

impl Metrics {
    /// The metrics in Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
