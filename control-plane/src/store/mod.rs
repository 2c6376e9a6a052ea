//! Durable, versioned storage of the desired state.
//!
//! Every change is a numbered revision. Documents are kept as rows valid
//! over a range of revisions (`[valid_from, valid_to)`), so the state at any
//! revision, and what a revision changed, are plain queries, and a rollback
//! is just a new revision. [`Store`] is the seam for other databases: the
//! SQL in [`sqlite`] sticks to what PostgreSQL accepts too.

mod sqlite;

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::model::ResourceKey;

pub use sqlite::SqliteStore;

/// A revision number. `0` is the empty state before the first apply.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    Serialize,
    Deserialize,
    ToSchema,
)]
#[serde(transparent)]
pub struct Revision(pub u64);

impl Revision {
    /// The revision after this one.
    pub fn next(self) -> Revision {
        Revision(self.0 + 1)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What kind of operation made a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// `portico apply`.
    Apply,
    /// `portico delete`.
    Delete,
    /// `portico rollback`.
    Rollback,
}

impl Operation {
    fn as_str(self) -> &'static str {
        match self {
            Operation::Apply => "apply",
            Operation::Delete => "delete",
            Operation::Rollback => "rollback",
        }
    }

    fn parse(s: &str) -> Option<Operation> {
        [Operation::Apply, Operation::Delete, Operation::Rollback]
            .into_iter()
            .find(|o| o.as_str() == s)
    }
}

/// What one revision did to one document.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ChangeAction {
    /// The document did not exist before.
    Created,
    /// The document existed and its content changed.
    Updated,
    /// The document no longer exists.
    Deleted,
}

/// One document's change, with its content before and after.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Change {
    /// The document.
    pub key: ResourceKey,
    /// What happened to it.
    pub action: ChangeAction,
    /// The document before (absent when created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::model::DocumentSchema>)]
    pub before: Option<Value>,
    /// The document after (absent when deleted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<crate::model::DocumentSchema>)]
    pub after: Option<Value>,
}

/// A revision's record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RevisionInfo {
    /// The revision's number.
    pub number: Revision,
    /// Name of the token that made it.
    pub author: String,
    /// When it was committed, RFC 3339 UTC.
    pub created_at: String,
    /// The operator's message.
    pub message: String,
    /// What made it.
    pub operation: Operation,
    /// For a rollback, the revision whose state it restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<Revision>,
    /// Documents created.
    pub created: u32,
    /// Documents updated.
    pub updated: u32,
    /// Documents deleted.
    pub deleted: u32,
}

/// A revision to commit: the document writes that make it.
#[derive(Debug, Clone)]
pub struct NewRevision {
    /// The head this revision was computed against; the commit fails with
    /// [`StoreError::HeadMoved`] if another writer got there first.
    pub parent: Revision,
    /// Name of the token that made it.
    pub author: String,
    /// The operator's message.
    pub message: String,
    /// What made it.
    pub operation: Operation,
    /// For a rollback, the revision restored.
    pub rollback_of: Option<Revision>,
    /// The documents that change: new content, or `None` to delete.
    pub writes: Vec<(ResourceKey, Option<Value>)>,
}

/// A stored API token (only its hash is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The token's name; recorded as the author of revisions.
    pub name: String,
    /// `sha256:<hex>` of the token.
    pub hash: String,
}

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer committed since the caller read the head.
    #[error(
        "the desired state is at revision {actual}, not {expected}; someone applied in between"
    )]
    HeadMoved {
        /// The head the caller expected.
        expected: Revision,
        /// The head found.
        actual: Revision,
    },
    /// The revision asked for does not exist.
    #[error("revision {0} does not exist")]
    NoSuchRevision(Revision),
    /// The database failed.
    #[error("store {location}: {source}")]
    Database {
        /// Which database (a file path).
        location: String,
        /// The driver's error.
        #[source]
        source: rusqlite::Error,
    },
    /// The database holds something this version cannot read.
    #[error("store {location}: {message}")]
    Corrupt {
        /// Which database.
        location: String,
        /// What is wrong.
        message: String,
    },
}

/// Durable storage of revisions, documents and tokens.
///
/// Calls block; async callers run them on the blocking pool. Each method is
/// atomic: a commit is all of its writes or none, even across a crash.
pub trait Store: Send + Sync + 'static {
    /// The latest revision, or `Revision(0)` when nothing was applied yet.
    fn head(&self) -> Result<Revision, StoreError>;
    /// Every document as of `at`, ordered by kind and name.
    fn load(&self, at: Revision) -> Result<Vec<(ResourceKey, Value)>, StoreError>;
    /// Commits a revision if the head is still `rev.parent`.
    fn commit(&self, rev: NewRevision) -> Result<RevisionInfo, StoreError>;
    /// Up to `limit` revisions, newest first, older than `before` if given.
    fn revisions(
        &self,
        limit: u32,
        before: Option<Revision>,
    ) -> Result<Vec<RevisionInfo>, StoreError>;
    /// One revision and the changes it made.
    fn revision(&self, number: Revision) -> Result<(RevisionInfo, Vec<Change>), StoreError>;
    /// All stored tokens.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Stores (or replaces) the token called `name`.
    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// A short description for status output, e.g. `sqlite:/var/lib/portico/portico.db`.
    fn describe(&self) -> String;
}
