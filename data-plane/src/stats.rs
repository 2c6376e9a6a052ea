//! Counters, kept as relaxed atomics and read by the admin thread.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Default)]
        pub struct $name { $($(#[$fm])* pub $field: AtomicU64,)* }
        impl $name {
            /// Every counter with its name.
            pub fn each(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($field), self.$field.load(Relaxed)),)*]
            }
        }
    };
}

counters!(
    /// Proxy-wide counters (Envoy's `http.<prefix>.*` and friends, summed).
    Stats {
        /// Downstream connections accepted.
        downstream_cx_total,
        /// Downstream connections open.
        downstream_cx_active,
        /// Connections closed at once: the listener's filter chain does
        /// not take them (`filter_chain_match`).
        no_filter_chain_match,
        /// Connections drained for reaching their request limit.
        downstream_cx_max_requests_reached,
        /// Connections drained for reaching their age limit.
        downstream_cx_max_duration_reached,
        /// Requests received.
        downstream_rq_total,
        /// Requests in flight.
        downstream_rq_active,
        /// Responses by class.
        downstream_rq_1xx, downstream_rq_2xx, downstream_rq_3xx, downstream_rq_4xx, downstream_rq_5xx,
        /// No virtual host or route matched.
        no_route,
        /// The route's cluster does not exist.
        no_cluster,
        /// The cluster had no available endpoint.
        no_healthy_upstream,
        /// Streams ended by the stream idle timeout.
        downstream_rq_idle_timeout,
        /// Requests not received whole within the HCM's `request_timeout`.
        downstream_rq_timeout,
        /// Streams ended by their duration limit (`max_stream_duration`,
        /// or a gRPC call's deadline).
        downstream_rq_max_duration_reached,
        /// Requests refused for their path: a malformed escape, or an
        /// escaped slash where the listener refuses them.
        downstream_rq_failed_path_normalization,
        /// Requests redirected to their path without escaped slashes.
        downstream_rq_redirected_with_normalized_path,
        /// Malformed HTTP/2 requests (Envoy's `http2.rx_messaging_error`).
        rx_messaging_error,
        /// Requests refused for a header name with an underscore.
        requests_rejected_with_underscores_in_headers,
        /// Request headers dropped for an underscore in their name.
        dropped_headers_with_underscores,
        /// Upstream did not answer in time.
        upstream_rq_timeout,
        /// Retries sent.
        upstream_rq_retry,
        /// WebSocket upgrades proxied.
        upstream_upgrades,
        /// Access log lines dropped because the writer fell behind.
        access_log_dropped,
        /// Config updates accepted and rejected, all types.
        xds_update_success, xds_update_rejected,
        /// Connections to the control plane.
        xds_connects,
    }
);

counters!(
    /// Per-cluster counters (Envoy's `cluster.<name>.*`).
    ClusterStats {
        /// Requests sent.
        upstream_rq_total,
        /// Responses by class.
        upstream_rq_2xx, upstream_rq_3xx, upstream_rq_4xx, upstream_rq_5xx,
        /// Connections opened.
        upstream_cx_total,
        /// Connections open now (to all endpoints; a gauge), against the
        /// circuit breaker's `max_connections`.
        upstream_cx_active,
        /// Connect failures.
        upstream_cx_connect_fail,
        /// Requests that found the circuit breaker's `max_connections`
        /// reached (and waited as pending requests).
        upstream_cx_overflow,
        /// Requests that waited for a connection (pending requests).
        upstream_rq_pending_total,
        /// Pending requests now (a gauge), against the circuit breaker's
        /// `max_pending_requests`.
        upstream_rq_pending_active,
        /// Requests refused by the circuit breaker: over its
        /// `max_pending_requests` or its `max_requests` (Envoy counts
        /// both here).
        upstream_rq_pending_overflow,
        /// Resets before response headers.
        upstream_rq_reset,
        /// Per-try or route timeouts.
        upstream_rq_timeout,
        /// Tries cut off by the cluster's own stream duration limit
        /// (`common_http_protocol_options.max_stream_duration`).
        upstream_rq_max_duration_reached,
        /// Retries.
        upstream_rq_retry,
        /// Requests dropped by the load assignment's `drop_overloads`.
        upstream_rq_drop_overload,
        /// Requests balanced in panic mode (too few endpoints available in
        /// the priority level they went to: every endpoint of it took
        /// traffic).
        lb_healthy_panic,
        /// Endpoints ejected.
        outlier_ejections,
        /// Health-check state changes.
        health_flaps,
        /// Endpoints known.
        membership_total,
        /// Load assignments that came with an `endpoint_stale_after`, and
        /// of them, those whose endpoints went stale (dropped: no other
        /// assignment came in time).
        assignment_timeout_received, assignment_stale,
    }
);

impl Stats {
    /// Counts a response by status class.
    pub fn count_status(&self, status: u16) {
        let c = match status {
            100..=199 => &self.downstream_rq_1xx,
            200..=299 => &self.downstream_rq_2xx,
            300..=399 => &self.downstream_rq_3xx,
            400..=499 => &self.downstream_rq_4xx,
            _ => &self.downstream_rq_5xx,
        };
        c.fetch_add(1, Relaxed);
    }
}

impl ClusterStats {
    /// Counts an upstream response by status class.
    pub fn count_status(&self, status: u16) {
        let c = match status {
            200..=299 => &self.upstream_rq_2xx,
            300..=399 => &self.upstream_rq_3xx,
            400..=499 => &self.upstream_rq_4xx,
            _ => &self.upstream_rq_5xx,
        };
        c.fetch_add(1, Relaxed);
    }
}
