//! Which HTTP/1.1 upgrades (`Upgrade: websocket`, or any other protocol
//! an operator lists) are tunnelled: Envoy's `upgrade_configs`, of the
//! connection manager and of a route, the route's word winning.

use super::ConfigError;

/// Upgrade types a connection manager or a route lists, each allowed or
/// not (`enabled`, true unless set).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Upgrades(Vec<(Box<str>, bool)>);

impl Upgrades {
    /// From `(upgrade_type, enabled)` pairs; `CONNECT` is refused (this
    /// proxy does not terminate CONNECT), as are empty or repeated types.
    pub fn convert<'a>(
        list: impl IntoIterator<Item = (&'a str, bool)>,
        at: &str,
    ) -> Result<Self, ConfigError> {
        let mut v: Vec<(Box<str>, bool)> = Vec::new();
        for (i, (kind, enabled)) in list.into_iter().enumerate() {
            let uat = format!("{at} upgrade_configs[{i}]");
            if kind.is_empty() {
                return Err(ConfigError::new(&uat, "needs an upgrade_type"));
            }
            if kind.eq_ignore_ascii_case("connect") {
                return Err(ConfigError::new(&uat, "CONNECT upgrades are not supported"));
            }
            // The same type twice is refused; types that differ only in
            // case are taken, the first winning (Envoy's lookup ignores
            // case).
            if v.iter().any(|(k, _)| **k == *kind) {
                return Err(ConfigError::new(
                    &uat,
                    format!("upgrade_type {kind:?} is listed twice"),
                ));
            }
            v.push((kind.into(), enabled));
        }
        Ok(Upgrades(v))
    }

    /// Whether nothing is listed (then nothing is said of any upgrade).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// What the list says of an `Upgrade` header's value: allowed, not,
    /// or nothing (not listed). Compared as Envoy does, whole and
    /// without regard to case.
    fn says(&self, upgrade: &[u8]) -> Option<bool> {
        self.0
            .iter()
            .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(upgrade))
            .map(|(_, enabled)| *enabled)
    }
}

/// Whether a request asking to upgrade to `upgrade` is tunnelled: as the
/// route says when it lists the type, else as the connection manager
/// does (Envoy's rule: a route may turn an upgrade off, or on where the
/// connection manager does not have it).
pub fn allowed(route: &Upgrades, hcm: &Upgrades, upgrade: &[u8]) -> bool {
    match route.says(upgrade) {
        Some(on) => on,
        None => hcm.says(upgrade) == Some(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_overrides_the_connection_manager() {
        let list =
            |v: &[(&str, bool)]| Upgrades::convert(v.iter().copied(), "here").expect("converts");
        let hcm = list(&[("websocket", true), ("Foo", false)]);
        let none = Upgrades::default();
        assert!(allowed(&none, &hcm, b"WebSocket"));
        assert!(!allowed(&none, &hcm, b"foo"), "listed but disabled");
        assert!(!allowed(&none, &hcm, b"bar"), "not listed");
        let route = list(&[("websocket", false), ("foo", true), ("bar", true)]);
        assert!(!allowed(&route, &hcm, b"websocket"));
        assert!(allowed(&route, &hcm, b"foo"));
        assert!(allowed(&route, &none, b"bar"));
        // Types that differ only in case are both taken; the first wins.
        let cased = list(&[("Foo", false), ("foo", true)]);
        assert!(!allowed(&cased, &none, b"FOO"));
        for (bad, why) in [
            (
                vec![("CONNECT", true)],
                "CONNECT upgrades are not supported",
            ),
            (vec![("", true)], "needs an upgrade_type"),
            (vec![("a", true), ("a", false)], "listed twice"),
        ] {
            let e = Upgrades::convert(bad, "here").unwrap_err().to_string();
            assert!(
                e.contains("here upgrade_configs[") && e.contains(why),
                "{e}"
            );
        }
    }
}
