//! A route's header edits as the router applies them: in Envoy's order
//! (a weighted cluster's own first, then route, virtual host and
//! configuration, or the reverse with
//! `most_specific_header_mutations_wins`), on the upstream's answers and
//! on the router's own, with the values Envoy's command operators make per
//! request read from a record of the request, built only when a value
//! needs one.

use http::{HeaderMap, HeaderName, StatusCode};

use crate::access_log::Record;
use crate::config::route::{Edits, Route, RouteTable};

/// The response header edits of a route and its weighted cluster: Envoy's
/// router applies them to its own answers (no healthy upstream, timeouts,
/// resets) as well as to the upstream's.
pub(super) struct RouteEdits<'a> {
    /// The weighted cluster's own.
    pub(super) target: Option<&'a Edits>,
    pub(super) route: &'a Edits,
    pub(super) vh: &'a Edits,
    pub(super) table: &'a RouteTable,
    /// What values made per request read, when one does.
    pub(super) fmt: Option<Box<Formatting>>,
}

impl RouteEdits<'_> {
    /// Applies them to the router's own answer of status `status`, made
    /// for the reason `flags` says (Envoy's response flags).
    pub(super) fn apply_response(&mut self, h: &mut HeaderMap, status: StatusCode, flags: &str) {
        if let Some(f) = self.fmt.as_deref_mut() {
            f.rec.response_flags = flags.into();
        }
        let order = edit_order(self.target, self.route, self.vh, self.table);
        apply_response(order, self.fmt.as_deref_mut(), h, status);
    }
}

/// Applies the response edits of `order` to an answer of status `status`;
/// the record, when values are made per request, notes the answer first.
pub(super) fn apply_response(
    order: [Option<&Edits>; 4],
    mut fmt: Option<&mut Formatting>,
    h: &mut HeaderMap,
    status: StatusCode,
) {
    if let Some(f) = fmt.as_deref_mut() {
        f.answered(status, h);
    }
    let rec = fmt.as_deref().map(|f| &f.rec);
    for e in order.into_iter().flatten() {
        e.apply_response(h, rec);
    }
}

/// The order header edits run in, Envoy's: a weighted cluster's own
/// first, then the route's, the virtual host's and the configuration's
/// (the last wins), or the other way round with
/// `most_specific_header_mutations_wins`.
pub(super) fn edit_order<'a>(
    target: Option<&'a Edits>,
    route: &'a Edits,
    vh: &'a Edits,
    table: &'a RouteTable,
) -> [Option<&'a Edits>; 4] {
    if table.most_specific_wins {
        [target, Some(&table.edits), Some(vh), Some(route)]
    } else {
        [target, Some(route), Some(vh), Some(&table.edits)]
    }
}

/// A record of the request for the header values a route's edits make per
/// request from Envoy's command operators (built only when one does).
pub(super) struct Formatting {
    /// The record the values read.
    pub(super) rec: Record,
    /// The response headers the values read.
    response_names: Vec<HeaderName>,
}

impl Formatting {
    /// For the edits of `levels`, when one of them makes a value per
    /// request: the request's record from `record` (given the request
    /// headers the values read), for route `route`.
    pub(super) fn new(
        levels: &[Option<&Edits>],
        route: &Route,
        record: impl FnOnce(&[HeaderName]) -> Record,
    ) -> Option<Box<Formatting>> {
        let levels = levels.iter().flatten();
        if !levels.clone().any(|e| e.formatted().contains(&true)) {
            return None;
        }
        let (mut req_names, mut response_names) = (Vec::new(), Vec::new());
        for e in levels {
            let (q, r) = e.format_headers();
            req_names.extend(q);
            response_names.extend(r);
        }
        let mut rec = record(&req_names);
        rec.route_name = route.name.to_string();
        Some(Box::new(Formatting {
            rec,
            response_names,
        }))
    }

    /// Notes the answer, for the response's values.
    pub(super) fn answered(&mut self, status: StatusCode, h: &HeaderMap) {
        self.rec.response_code = status.as_u16();
        self.rec.response_headers = crate::access_log::logged_headers(&self.response_names, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_edits_run_in_envoys_order() {
        use portico_proto::envoy::config::route::v3::RouteConfiguration;
        let mut rc = RouteConfiguration::default();
        let table = RouteTable::convert(&rc).expect("converts");
        let (t, r, v) = (Edits::default(), Edits::default(), Edits::default());
        let at = |order: [Option<&Edits>; 4], e: &Edits| {
            order
                .iter()
                .position(|x| x.is_some_and(|x| std::ptr::eq(x, e)))
        };
        let order = edit_order(Some(&t), &r, &v, &table);
        assert_eq!(
            [
                at(order, &t),
                at(order, &r),
                at(order, &v),
                at(order, &table.edits)
            ],
            [Some(0), Some(1), Some(2), Some(3)]
        );
        rc.most_specific_header_mutations_wins = true;
        let table = RouteTable::convert(&rc).expect("converts");
        let order = edit_order(Some(&t), &r, &v, &table);
        // The weighted cluster's own still come first (Envoy's).
        assert_eq!(
            [
                at(order, &t),
                at(order, &table.edits),
                at(order, &v),
                at(order, &r)
            ],
            [Some(0), Some(1), Some(2), Some(3)]
        );
    }
}
