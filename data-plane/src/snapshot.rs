//! The running configuration: one immutable [`Snapshot`] swapped whole
//! (latest value wins). A request loads it once and keeps it to the end,
//! so a config change never affects a request already in flight.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::access_log::AccessLogs;
use crate::config::listener::ListenerConfig;
use crate::config::route::RouteTable;
use crate::shutdown::Shutdown;
use crate::stats::Stats;
use crate::upstream::Cluster;
use crate::xds::dump::ConfigDump;

/// Everything a request needs, converted and linked.
#[derive(Default)]
pub struct Snapshot {
    /// Listeners by name.
    pub listeners: BTreeMap<Arc<str>, Arc<ListenerConfig>>,
    /// Route tables by name (RDS). These maps, looked up by every
    /// request, hash with foldhash: their keys come from the config, so
    /// SipHash's defence against chosen collisions buys nothing here.
    pub routes: foldhash::HashMap<Arc<str>, Arc<RouteTable>>,
    /// Clusters by name.
    pub clusters: foldhash::HashMap<Arc<str>, Arc<Cluster>>,
    /// The Envoy resources this came from, for `/config_dump`.
    pub dump: Arc<ConfigDump>,
}

/// State shared by the xDS client, the listeners and the admin thread.
#[derive(Default)]
pub struct Shared {
    /// The current snapshot.
    pub snapshot: ArcSwap<Snapshot>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Whether a first configuration has been applied.
    pub ready: AtomicBool,
    /// Whether the control plane stream is up.
    pub xds_connected: AtomicBool,
    /// Access log writers.
    pub access_logs: AccessLogs,
    /// The process-wide drain before exit.
    pub shutdown: Shutdown,
}
