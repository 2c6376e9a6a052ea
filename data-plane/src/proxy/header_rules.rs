//! The listener's rule on header names with an underscore
//! ([`HeaderRules::underscores`]), decided and counted in one place for
//! both codecs and for trailers.

use std::sync::atomic::Ordering::Relaxed;

use crate::config::listener::{HeaderRules, Underscores};
use crate::stats::Stats;

/// What becomes of one header field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admit {
    /// It stays.
    Keep,
    /// It is removed (and counted as dropped).
    Drop,
    /// The request is refused (and counted as rejected).
    Refuse,
}

/// Decides on a field by its name; a drop or a refusal is counted here.
#[inline]
pub(super) fn admit(rules: &HeaderRules, name: &[u8], stats: &Stats) -> Admit {
    if rules.underscores == Underscores::Allow || !name.contains(&b'_') {
        return Admit::Keep;
    }
    if rules.underscores == Underscores::Reject {
        stats
            .requests_rejected_with_underscores_in_headers
            .fetch_add(1, Relaxed);
        Admit::Refuse
    } else {
        stats.dropped_headers_with_underscores.fetch_add(1, Relaxed);
        Admit::Drop
    }
}
