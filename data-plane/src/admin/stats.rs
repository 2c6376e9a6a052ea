//! `/stats` in Envoy's forms: text (`name: value` lines), JSON
//! (`?format=json`) and Prometheus (`/stats/prometheus` or
//! `?format=prometheus`: a `# TYPE` line per metric and all of its samples
//! together, as the exposition format requires). `?filter=REGEX` keeps the
//! stats whose text name the regex finds; `?usedonly` keeps those that are
//! not zero (Envoy's "written at least once", which Portico does not track
//! apart from the value).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use regex::Regex;

use crate::config::matcher::percent_decode;
use crate::snapshot::Shared;

/// How the stats are wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Format {
    /// `name: value` lines.
    Text,
    /// `{"stats": [{"name": …, "value": …}]}`.
    Json,
    /// Prometheus text exposition.
    Prometheus,
}

/// A `/stats` request's query.
#[derive(Debug)]
pub(super) struct Query {
    format: Format,
    filter: Option<Regex>,
    used_only: bool,
}

impl Query {
    /// Reads the query string; `format` is the path's default. The error
    /// names the parameter that is wrong.
    pub(super) fn parse(query: Option<&str>, format: Format) -> Result<Query, String> {
        let mut q = Query {
            format,
            filter: None,
            used_only: false,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(v);
            match k {
                "filter" if !v.is_empty() => {
                    let re = Regex::new(&v)
                        .map_err(|e| format!("filter: not a valid regex ({v:?}): {e}"))?;
                    q.filter = Some(re);
                }
                "filter" => {}
                "usedonly" => q.used_only = true,
                "format" => {
                    q.format = match v.as_str() {
                        "json" => Format::Json,
                        "prometheus" => Format::Prometheus,
                        "text" => Format::Text,
                        other => {
                            return Err(format!(
                                "format: {other:?} is not one of json, prometheus, text"
                            ))
                        }
                    }
                }
                // Envoy's other options (histogram buckets, type) have
                // nothing to act on here.
                _ => {}
            }
        }
        Ok(q)
    }
}

/// One stat: `scope.name`, or `scope.CLUSTER.name` for a cluster's.
struct Stat {
    scope: &'static str,
    cluster: Option<Arc<str>>,
    name: &'static str,
    value: u64,
}

impl Stat {
    fn text_name(&self) -> String {
        match &self.cluster {
            Some(c) => format!("{}.{c}.{}", self.scope, self.name),
            None => format!("{}.{}", self.scope, self.name),
        }
    }

    /// Envoy's gauges (values that go down as well as up); the rest are
    /// counters.
    fn is_gauge(&self) -> bool {
        self.name.ends_with("_active")
            || matches!(
                (self.scope, self.name),
                ("server", "live")
                    | ("control_plane", "connected_state")
                    | ("cluster_manager", "active_clusters")
                    | ("cluster", "membership_total")
            )
    }
}

/// Every stat, in a stable order.
fn collect(shared: &Shared) -> Vec<Stat> {
    let snap = shared.snapshot.load();
    let plain = |scope, name, value| Stat {
        scope,
        cluster: None,
        name,
        value,
    };
    let mut out = vec![
        plain("server", "live", shared.ready.load(Relaxed) as u64),
        plain(
            "control_plane",
            "connected_state",
            shared.xds_connected.load(Relaxed) as u64,
        ),
        plain(
            "listener_manager",
            "total_listeners_active",
            snap.listeners.len() as u64,
        ),
        plain(
            "cluster_manager",
            "active_clusters",
            snap.clusters.len() as u64,
        ),
    ];
    out.extend(shared.stats.each().into_iter().map(|(name, value)| {
        // Envoy counts it per listener, not per connection manager, and
        // its codecs' own under `http2`.
        let scope = match name {
            "no_filter_chain_match" => "listener",
            "rx_messaging_error" => "http2",
            _ => "http",
        };
        plain(scope, name, value)
    }));
    let mut names: Vec<_> = snap.clusters.keys().collect();
    names.sort();
    for n in names {
        let c = &snap.clusters[n];
        let of = |name, value| Stat {
            scope: "cluster",
            cluster: Some(n.clone()),
            name,
            value,
        };
        out.extend(c.stats.each().into_iter().map(|(k, v)| of(k, v)));
        out.push(of("upstream_rq_active", c.active.load(Relaxed) as u64));
    }
    out
}

/// The body and its content type.
pub(super) fn render(shared: &Shared, q: &Query) -> (String, &'static str) {
    let stats = collect(shared).into_iter().filter(|s| {
        (!q.used_only || s.value != 0)
            && q.filter
                .as_ref()
                .is_none_or(|re| re.is_match(&s.text_name()))
    });
    match q.format {
        Format::Text => {
            let mut out = String::new();
            for s in stats {
                let _ = writeln!(out, "{}: {}", s.text_name(), s.value);
            }
            (out, "text/plain")
        }
        Format::Json => {
            let list: Vec<_> = stats
                .map(|s| serde_json::json!({"name": s.text_name(), "value": s.value}))
                .collect();
            let body = serde_json::to_string_pretty(&serde_json::json!({ "stats": list }))
                .unwrap_or_default();
            (body, "application/json")
        }
        Format::Prometheus => (prometheus(stats), "text/plain; version=0.0.4"),
    }
}

/// One metric family per name (`envoy_` + the name without its cluster,
/// dots as underscores), the cluster as the `envoy_cluster_name` label.
fn prometheus(stats: impl Iterator<Item = Stat>) -> String {
    let mut families: BTreeMap<String, (bool, Vec<Stat>)> = BTreeMap::new();
    for s in stats {
        let metric = format!("envoy_{}_{}", s.scope, s.name).replace(['.', '-'], "_");
        let family = families.entry(metric).or_insert((s.is_gauge(), Vec::new()));
        family.1.push(s);
    }
    let mut out = String::new();
    for (metric, (gauge, samples)) in families {
        let kind = if gauge { "gauge" } else { "counter" };
        let _ = writeln!(out, "# TYPE {metric} {kind}");
        for s in samples {
            match &s.cluster {
                Some(c) => {
                    let c = c.replace('\\', "\\\\").replace('"', "\\\"");
                    let _ = writeln!(out, "{metric}{{envoy_cluster_name=\"{c}\"}} {}", s.value);
                }
                None => {
                    let _ = writeln!(out, "{metric} {}", s.value);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(scope: &'static str, cluster: Option<&str>, name: &'static str, value: u64) -> Stat {
        Stat {
            scope,
            cluster: cluster.map(Arc::from),
            name,
            value,
        }
    }

    /// Samples of one metric stay together under one `# TYPE` line, with
    /// gauges told apart from counters and label values escaped.
    #[test]
    fn prometheus_groups_each_metric_under_its_type() {
        let out = prometheus(
            [
                stat("http", None, "downstream_cx_active", 3),
                stat("cluster", Some("a"), "upstream_rq_total", 5),
                stat("cluster", Some("a"), "upstream_cx_active", 1),
                stat("cluster", Some("b\"q"), "upstream_rq_total", 7),
                stat("cluster", Some("b\"q"), "upstream_cx_active", 0),
            ]
            .into_iter(),
        );
        assert_eq!(
            out,
            "# TYPE envoy_cluster_upstream_cx_active gauge\n\
             envoy_cluster_upstream_cx_active{envoy_cluster_name=\"a\"} 1\n\
             envoy_cluster_upstream_cx_active{envoy_cluster_name=\"b\\\"q\"} 0\n\
             # TYPE envoy_cluster_upstream_rq_total counter\n\
             envoy_cluster_upstream_rq_total{envoy_cluster_name=\"a\"} 5\n\
             envoy_cluster_upstream_rq_total{envoy_cluster_name=\"b\\\"q\"} 7\n\
             # TYPE envoy_http_downstream_cx_active gauge\n\
             envoy_http_downstream_cx_active 3\n"
        );
    }

    #[test]
    fn queries_are_read_and_bad_ones_named() {
        let q = Query::parse(
            Some("filter=%5Ecluster%5C.&usedonly&format=json"),
            Format::Text,
        )
        .expect("valid");
        assert_eq!(q.format, Format::Json);
        assert!(q.used_only);
        let re = q.filter.expect("filter");
        assert!(re.is_match("cluster.s.upstream_rq_total"));
        assert!(!re.is_match("http.no_cluster"));
        let e = Query::parse(Some("filter=(unclosed"), Format::Text).expect_err("bad regex");
        assert!(e.starts_with("filter: not a valid regex"), "{e}");
        let e = Query::parse(Some("format=xml"), Format::Text).expect_err("bad format");
        assert!(e.contains("\"xml\""), "{e}");
        let q = Query::parse(None, Format::Prometheus).expect("empty");
        assert_eq!(q.format, Format::Prometheus);
    }
}
