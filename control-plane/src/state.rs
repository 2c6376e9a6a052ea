//! The desired state in memory, and every way it changes.
//!
//! [`StateService`] is the only writer. An apply, a delete and a rollback
//! all follow one path: compute the whole next state, validate it whole,
//! diff it against the current one, commit the diff as one revision, then
//! publish the new immutable [`Snapshot`]. Readers (the admin API now, the
//! xDS server later) take the latest snapshot without locking the writers.

use std::sync::Arc;

use tokio::sync::{watch, Mutex};

use crate::model::decode::{self, SourceDocument};
use crate::model::{DesiredState, ResourceKey};
use crate::problem::Problem;
use crate::store::{
    Change, ChangeAction, NewRevision, Operation, Revision, RevisionInfo, Store, StoreError,
};
use crate::validate::validate_with;

/// The desired state as of one revision. Immutable once published.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// The revision this state is.
    pub revision: Revision,
    /// Every document.
    pub state: DesiredState,
}

/// Who is writing and under what conditions.
#[derive(Debug, Clone, Default)]
pub struct WriteOptions {
    /// Name of the token making the change.
    pub author: String,
    /// The operator's message for the revision.
    pub message: String,
    /// Fail unless the head is this revision (optimistic concurrency).
    pub expect_revision: Option<Revision>,
    /// Validate and diff only; commit nothing.
    pub dry_run: bool,
}

/// The result of a write.
#[derive(Debug, Clone)]
pub struct WriteOutcome {
    /// The head after the write (unchanged when nothing changed or dry run).
    pub revision: Revision,
    /// The new revision's record, when one was committed.
    pub committed: Option<RevisionInfo>,
    /// What changed (or would change), per document.
    pub changes: Vec<Change>,
}

/// Why a write was refused. Nothing was changed in any case.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The documents or the resulting state break rules.
    #[error("the desired state would be invalid ({} problem(s))", .0.len())]
    Invalid(Vec<Problem>),
    /// `expect_revision` did not hold.
    #[error(
        "the desired state is at revision {actual}, not {expected}; someone applied in between"
    )]
    Conflict {
        /// What the caller expected.
        expected: Revision,
        /// The actual head.
        actual: Revision,
    },
    /// The document to delete does not exist.
    #[error("{0} does not exist")]
    NotFound(ResourceKey),
    /// The revision to roll back to does not exist.
    #[error("revision {0} does not exist")]
    NoSuchRevision(Revision),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for WriteError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::HeadMoved { expected, actual } => WriteError::Conflict { expected, actual },
            StoreError::NoSuchRevision(r) => WriteError::NoSuchRevision(r),
            other => WriteError::Store(other),
        }
    }
}

/// A failure to load the stored state at start-up.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored document no longer passes decoding.
    #[error("stored document {key} cannot be read by this release: {problems}")]
    Undecodable {
        /// Which document.
        key: ResourceKey,
        /// Why.
        problems: String,
    },
}

/// Owns the desired state: the store, the current snapshot, and the lock
/// that serialises writers in this process (the store's head check
/// serialises writers across processes).
pub struct StateService {
    store: Arc<dyn Store>,
    current: watch::Sender<Arc<Snapshot>>,
    writer: Mutex<()>,
}

impl StateService {
    /// Loads the latest revision from `store`.
    pub async fn load(store: Arc<dyn Store>) -> Result<Self, LoadError> {
        let snapshot = blocking({
            let store = store.clone();
            move || load_snapshot(&*store, None)
        })
        .await?;
        let (current, _) = watch::channel(Arc::new(snapshot));
        Ok(StateService {
            store,
            current,
            writer: Mutex::new(()),
        })
    }

    /// The latest published snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.borrow().clone()
    }

    /// A receiver that sees every newly published snapshot (latest wins).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.current.subscribe()
    }

    /// The store behind this service.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Creates or replaces the given documents. Documents not named are
    /// kept. All or nothing.
    pub async fn apply(
        &self,
        documents: Vec<SourceDocument>,
        opts: WriteOptions,
    ) -> Result<WriteOutcome, WriteError> {
        let decoded = decode::decode_all(&documents);
        let carried = (decoded.problems, decoded.complete);
        let resources = decoded.resources;
        self.write(Operation::Apply, None, opts, carried, move |state| {
            state.extend(resources);
            Ok(())
        })
        .await
    }

    /// Deletes one document.
    pub async fn delete(
        &self,
        key: ResourceKey,
        opts: WriteOptions,
    ) -> Result<WriteOutcome, WriteError> {
        self.write(
            Operation::Delete,
            None,
            opts,
            (Vec::new(), true),
            move |state| {
                if state.remove(&key).is_none() {
                    return Err(WriteError::NotFound(key));
                }
                // Say why the delete is refused in terms of the document being
                // deleted, rather than as dangling references elsewhere.
                let users = crate::validate::referrers(state, &key);
                if users.is_empty() {
                    return Ok(());
                }
                Err(WriteError::Invalid(
                    users
                        .into_iter()
                        .map(|(user, path)| {
                            Problem::reference(
                                key.to_string(),
                                "",
                                format!(
                                    "still used by {user} at {path}; change or delete that first"
                                ),
                            )
                        })
                        .collect(),
                ))
            },
        )
        .await
    }

    /// Makes the state what it was at `target`, as a new revision.
    pub async fn rollback(
        &self,
        target: Revision,
        opts: WriteOptions,
    ) -> Result<WriteOutcome, WriteError> {
        let store = self.store.clone();
        let old = blocking(move || load_snapshot(&*store, Some(target))).await;
        let old = match old {
            Ok(s) => s.state,
            Err(LoadError::Store(e)) => return Err(e.into()),
            Err(e @ LoadError::Undecodable { .. }) => {
                return Err(WriteError::Invalid(vec![Problem::document(
                    format!("revision {target}"),
                    "",
                    e.to_string(),
                )]))
            }
        };
        self.write(
            Operation::Rollback,
            Some(target),
            opts,
            (Vec::new(), true),
            move |state| {
                *state = old;
                Ok(())
            },
        )
        .await
    }

    /// Validates `documents` as if applied, without the writer lock.
    pub fn check(&self, documents: &[SourceDocument]) -> Vec<Problem> {
        let decoded = decode::decode_all(documents);
        let mut state = self.snapshot().state.clone();
        state.extend(decoded.resources);
        validate_with(&state, decoded.problems, decoded.complete)
    }

    async fn write(
        &self,
        operation: Operation,
        rollback_of: Option<Revision>,
        opts: WriteOptions,
        (carried, complete): (Vec<Problem>, bool),
        edit: impl FnOnce(&mut DesiredState) -> Result<(), WriteError> + Send + 'static,
    ) -> Result<WriteOutcome, WriteError> {
        let _writer = self.writer.lock().await;
        let current = self.snapshot();
        if let Some(expected) = opts.expect_revision {
            if expected != current.revision {
                return Err(WriteError::Conflict {
                    expected,
                    actual: current.revision,
                });
            }
        }
        // Validating a large state takes milliseconds of CPU: do it on the
        // blocking pool so admin reads (and later xDS) keep being served.
        let base = current.clone();
        let started = std::time::Instant::now();
        let (next, changes) = blocking(move || {
            let mut next = base.state.clone();
            edit(&mut next)?;
            let problems = validate_with(&next, carried, complete);
            if !problems.is_empty() {
                return Err(WriteError::Invalid(problems));
            }
            let changes = diff(&base.state, &next);
            share_unchanged(&base.state, &mut next);
            Ok((next, changes))
        })
        .await?;
        if changes.is_empty() || opts.dry_run {
            return Ok(WriteOutcome {
                revision: current.revision,
                committed: None,
                changes,
            });
        }
        let new_revision = NewRevision {
            parent: current.revision,
            author: opts.author,
            message: opts.message,
            operation,
            rollback_of,
            writes: changes
                .iter()
                .map(|c| (c.key.clone(), c.after.clone()))
                .collect(),
        };
        let validated = started.elapsed();
        let store = self.store.clone();
        let info = blocking(move || store.commit(new_revision)).await?;
        tracing::info!(
            revision = %info.number,
            operation = ?operation,
            author = %info.author,
            created = info.created,
            updated = info.updated,
            deleted = info.deleted,
            validate_ms = validated.as_secs_f64() * 1e3,
            commit_ms = (started.elapsed() - validated).as_secs_f64() * 1e3,
            "committed a revision"
        );
        self.current.send_replace(Arc::new(Snapshot {
            revision: info.number,
            state: next,
        }));
        Ok(WriteOutcome {
            revision: info.number,
            committed: Some(info),
            changes,
        })
    }
}

/// Points every document of `next` equal to its counterpart in `old` at
/// that same `Arc`, so later stages (the xDS rendering cache) see an
/// unchanged document as the same pointer.
fn share_unchanged(old: &DesiredState, next: &mut DesiredState) {
    for (key, res) in next.iter_mut() {
        if let Some(prev) = old.get(key) {
            if !Arc::ptr_eq(prev, res) && prev == res {
                *res = prev.clone();
            }
        }
    }
}

/// The per-document differences from `old` to `new`, ordered by key.
pub fn diff(old: &DesiredState, new: &DesiredState) -> Vec<Change> {
    let mut out = Vec::new();
    for (key, res) in new {
        match old.get(key) {
            None => out.push(Change {
                key: key.clone(),
                action: ChangeAction::Created,
                before: None,
                after: Some(res.to_json()),
            }),
            Some(prev) if prev != res => out.push(Change {
                key: key.clone(),
                action: ChangeAction::Updated,
                before: Some(prev.to_json()),
                after: Some(res.to_json()),
            }),
            Some(_) => {}
        }
    }
    for (key, prev) in old {
        if !new.contains_key(key) {
            out.push(Change {
                key: key.clone(),
                action: ChangeAction::Deleted,
                before: Some(prev.to_json()),
                after: None,
            });
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

fn load_snapshot(store: &dyn Store, at: Option<Revision>) -> Result<Snapshot, LoadError> {
    let head = store.head()?;
    let revision = at.unwrap_or(head);
    if revision > head || (at.is_some() && revision == Revision(0)) {
        return Err(StoreError::NoSuchRevision(revision).into());
    }
    let mut state = DesiredState::new();
    for (key, value) in store.load(revision)? {
        let doc = SourceDocument {
            origin: key.to_string(),
            value,
        };
        let res = decode::decode(&doc).map_err(|problems| LoadError::Undecodable {
            key: key.clone(),
            problems: problems
                .iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        })?;
        state.insert(key, Arc::new(res));
    }
    Ok(Snapshot { revision, state })
}

/// Runs blocking store work off the async workers.
async fn blocking<T: Send + 'static, E: From<StoreError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        // The closure panicked: surface it rather than hide it.
        Err(join) => std::panic::resume_unwind(join.into_panic()),
    }
}
