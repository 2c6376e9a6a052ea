//! Rules for `kind: Gateway`.

use std::collections::{BTreeMap, HashSet};

use super::{rules, Report};
use crate::model::gateway::{GatewaySpec, ListenerProtocol};
use crate::model::{DesiredState, Spec};
use crate::problem::Problem;

pub(super) fn check(spec: &GatewaySpec, r: &mut Report<'_>) {
    if spec.node_group.is_empty() {
        r.value("spec.nodeGroup", "must not be empty");
    } else if !spec
        .node_group
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        r.value(
            "spec.nodeGroup",
            format!(
                "{:?} may contain only letters, digits, '-', '_' and '.'",
                spec.node_group
            ),
        );
    }
    if spec.listeners.is_empty() {
        r.value("spec.listeners", "a Gateway needs at least one listener");
    }
    let mut names = HashSet::new();
    let mut ports = BTreeMap::new();
    for (i, l) in spec.listeners.iter().enumerate() {
        let at = format!("spec.listeners[{i}]");
        r.check(format!("{at}.name"), rules::check_name(&l.name));
        if !names.insert(l.name.as_str()) {
            r.value(
                format!("{at}.name"),
                format!("duplicate listener name {:?}", l.name),
            );
        }
        if l.port == 0 {
            r.value(format!("{at}.port"), "must be between 1 and 65535");
        } else if let Some(first) = ports.insert(l.port, i) {
            r.value(
                format!("{at}.port"),
                format!("port {} is already used by spec.listeners[{first}]", l.port),
            );
        }
        let mut hosts = HashSet::new();
        for (j, h) in l.hostnames.iter().enumerate() {
            r.check(
                format!("{at}.hostnames[{j}]"),
                rules::check_hostname(h, true),
            );
            if !hosts.insert(h) {
                r.value(
                    format!("{at}.hostnames[{j}]"),
                    format!("duplicate host name {h:?}"),
                );
            }
        }
        match (l.protocol, &l.tls) {
            (ListenerProtocol::Https, None) => r.value(
                format!("{at}.tls"),
                "an HTTPS listener needs tls.certificateRefs",
            ),
            (ListenerProtocol::Http, Some(_)) => r.value(
                format!("{at}.tls"),
                "an HTTP listener cannot have tls; use protocol HTTPS",
            ),
            (_, Some(tls)) => {
                if tls.certificate_refs.is_empty() {
                    r.value(
                        format!("{at}.tls.certificateRefs"),
                        "at least one certificate is needed",
                    );
                }
                for (j, c) in tls.certificate_refs.iter().enumerate() {
                    r.check(
                        format!("{at}.tls.certificateRefs[{j}].name"),
                        rules::check_name(&c.name),
                    );
                }
            }
            (ListenerProtocol::Http, None) => {}
        }
    }
}

/// Two Gateways of one node group cannot both listen on one port: the
/// nodes would be asked to bind it twice.
pub(super) fn check_shared_ports(state: &DesiredState, problems: &mut Vec<Problem>) {
    let mut seen: BTreeMap<(&str, u16), String> = BTreeMap::new();
    for (key, res) in state {
        let Spec::Gateway(spec) = &res.spec else {
            continue;
        };
        for (i, l) in spec.listeners.iter().enumerate() {
            let slot = (spec.node_group.as_str(), l.port);
            match seen.get(&slot) {
                Some(owner) if *owner != key.to_string() => problems.push(Problem::reference(
                    key.to_string(),
                    format!("spec.listeners[{i}].port"),
                    format!(
                        "port {} in node group {:?} is already used by {owner}",
                        l.port, spec.node_group
                    ),
                )),
                Some(_) => {}
                None => {
                    seen.insert(slot, key.to_string());
                }
            }
        }
    }
}
