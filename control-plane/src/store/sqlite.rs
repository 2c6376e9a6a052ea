//! The embedded default store: one SQLite file in the data directory.
//!
//! Durability: WAL journal with `synchronous=FULL`, so a commit that
//! returned survives a crash of the process or the machine, and one that
//! did not return leaves no trace. Writers take `BEGIN IMMEDIATE` so the
//! head check and the writes are one atomic step.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde_json::Value;

use super::{
    Change, ChangeAction, NewRevision, Operation, Revision, RevisionInfo, Store, StoreError,
    TokenRecord,
};
use crate::model::{Kind, ResourceKey};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS portico_schema (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS revisions (
    number      BIGINT PRIMARY KEY,
    author      TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    message     TEXT NOT NULL,
    operation   TEXT NOT NULL,
    rollback_of BIGINT,
    created     INTEGER NOT NULL,
    updated     INTEGER NOT NULL,
    deleted     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS resources (
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    valid_from BIGINT NOT NULL,
    valid_to   BIGINT,
    body       TEXT NOT NULL,
    PRIMARY KEY (kind, name, valid_from)
);
CREATE INDEX IF NOT EXISTS resources_valid_to ON resources (valid_to);
CREATE INDEX IF NOT EXISTS resources_valid_from ON resources (valid_from);
CREATE TABLE IF NOT EXISTS tokens (
    name       TEXT PRIMARY KEY,
    hash       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);
";

const SCHEMA_VERSION: i64 = 1;

/// A [`Store`] in one SQLite database file.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let location = path.display().to_string();
        let db = |source| StoreError::Database {
            location: location.clone(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        let version: Option<i64> = conn
            .query_row("SELECT version FROM portico_schema", [], |r| r.get(0))
            .optional()
            .map_err(db)?;
        match version {
            None => {
                conn.execute(
                    "INSERT INTO portico_schema (version) VALUES (?1)",
                    [SCHEMA_VERSION],
                )
                .map_err(db)?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(other) => {
                return Err(StoreError::Corrupt {
                    location,
                    message: format!(
                        "schema version {other} is not {SCHEMA_VERSION}; \
                         this database was written by another Portico release"
                    ),
                })
            }
        }
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    fn db(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Database {
            location: self.path.display().to_string(),
            source,
        }
    }

    fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt {
            location: self.path.display().to_string(),
            message,
        }
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // A panic while holding the lock cannot leave SQLite inconsistent
        // (transactions roll back on drop), so a poisoned lock is usable.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn)
    }

    fn parse_key(&self, kind: &str, name: String) -> Result<ResourceKey, StoreError> {
        Kind::parse_exact(kind)
            .map(|k| ResourceKey::new(k, name))
            .ok_or_else(|| self.corrupt(format!("unknown kind {kind:?} in table resources")))
    }

    fn parse_body(&self, body: &str) -> Result<Value, StoreError> {
        serde_json::from_str(body).map_err(|e| self.corrupt(format!("unreadable document: {e}")))
    }

    fn row_to_info(&self, row: RevisionRow) -> Result<RevisionInfo, StoreError> {
        Ok(RevisionInfo {
            number: Revision(row.number as u64),
            author: row.author,
            created_at: row.created_at,
            message: row.message,
            operation: Operation::parse(&row.operation)
                .ok_or_else(|| self.corrupt(format!("unknown operation {:?}", row.operation)))?,
            rollback_of: row.rollback_of.map(|r| Revision(r as u64)),
            created: row.created as u32,
            updated: row.updated as u32,
            deleted: row.deleted as u32,
        })
    }
}

struct RevisionRow {
    number: i64,
    author: String,
    created_at: String,
    message: String,
    operation: String,
    rollback_of: Option<i64>,
    created: i64,
    updated: i64,
    deleted: i64,
}

const REVISION_COLUMNS: &str =
    "number, author, created_at, message, operation, rollback_of, created, updated, deleted";

fn revision_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RevisionRow> {
    Ok(RevisionRow {
        number: r.get(0)?,
        author: r.get(1)?,
        created_at: r.get(2)?,
        message: r.get(3)?,
        operation: r.get(4)?,
        rollback_of: r.get(5)?,
        created: r.get(6)?,
        updated: r.get(7)?,
        deleted: r.get(8)?,
    })
}

fn head_of(conn: &Connection) -> rusqlite::Result<Revision> {
    let n: Option<i64> = conn.query_row("SELECT MAX(number) FROM revisions", [], |r| r.get(0))?;
    Ok(Revision(n.unwrap_or(0) as u64))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl Store for SqliteStore {
    fn head(&self) -> Result<Revision, StoreError> {
        self.with_conn(|c| head_of(c).map_err(|e| self.db(e)))
    }

    fn load(&self, at: Revision) -> Result<Vec<(ResourceKey, Value)>, StoreError> {
        self.with_conn(|c| {
            // The head's documents are exactly the open rows, which an
            // index finds without scanning the history.
            let at_head = at >= head_of(c).map_err(|e| self.db(e))?;
            let sql = if at_head {
                "SELECT kind, name, body FROM resources WHERE valid_to IS NULL AND ?1 >= 0"
            } else {
                "SELECT kind, name, body FROM resources
                 WHERE valid_from <= ?1 AND (valid_to IS NULL OR valid_to > ?1)"
            };
            let mut stmt = c.prepare_cached(sql).map_err(|e| self.db(e))?;
            let rows = stmt
                .query_map([at.0 as i64], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })
                .map_err(|e| self.db(e))?;
            let mut out = Vec::new();
            for row in rows {
                let (kind, name, body) = row.map_err(|e| self.db(e))?;
                out.push((self.parse_key(&kind, name)?, self.parse_body(&body)?));
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(out)
        })
    }

    fn commit(&self, rev: NewRevision) -> Result<RevisionInfo, StoreError> {
        self.with_conn(|c| {
            let tx = c
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| self.db(e))?;
            let head = head_of(&tx).map_err(|e| self.db(e))?;
            if head != rev.parent {
                return Err(StoreError::HeadMoved {
                    expected: rev.parent,
                    actual: head,
                });
            }
            let number = head.next();
            let n = number.0 as i64;
            let (mut created, mut updated, mut deleted) = (0u32, 0u32, 0u32);
            {
                let mut close = tx
                    .prepare_cached(
                        "UPDATE resources SET valid_to = ?1
                         WHERE kind = ?2 AND name = ?3 AND valid_to IS NULL",
                    )
                    .map_err(|e| self.db(e))?;
                let mut insert = tx
                    .prepare_cached(
                        "INSERT INTO resources (kind, name, valid_from, valid_to, body)
                         VALUES (?1, ?2, ?3, NULL, ?4)",
                    )
                    .map_err(|e| self.db(e))?;
                for (key, body) in &rev.writes {
                    let kind = key.kind.as_str();
                    let closed = close
                        .execute(params![n, kind, key.name])
                        .map_err(|e| self.db(e))?;
                    match body {
                        Some(body) => {
                            insert
                                .execute(params![kind, key.name, n, body.to_string()])
                                .map_err(|e| self.db(e))?;
                            if closed > 0 {
                                updated += 1
                            } else {
                                created += 1
                            }
                        }
                        None if closed > 0 => deleted += 1,
                        None => {}
                    }
                }
            }
            let info = RevisionInfo {
                number,
                author: rev.author,
                created_at: now_rfc3339(),
                message: rev.message,
                operation: rev.operation,
                rollback_of: rev.rollback_of,
                created,
                updated,
                deleted,
            };
            tx.execute(
                &format!("INSERT INTO revisions ({REVISION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"),
                params![
                    n,
                    info.author,
                    info.created_at,
                    info.message,
                    info.operation.as_str(),
                    info.rollback_of.map(|r| r.0 as i64),
                    created,
                    updated,
                    deleted
                ],
            )
            .map_err(|e| self.db(e))?;
            tx.commit().map_err(|e| self.db(e))?;
            Ok(info)
        })
    }

    fn revisions(
        &self,
        limit: u32,
        before: Option<Revision>,
    ) -> Result<Vec<RevisionInfo>, StoreError> {
        let rows = self.with_conn(|c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {REVISION_COLUMNS} FROM revisions WHERE number < ?1
                     ORDER BY number DESC LIMIT ?2"
                ))
                .map_err(|e| self.db(e))?;
            let before = before.map(|b| b.0 as i64).unwrap_or(i64::MAX);
            let rows = stmt
                .query_map(params![before, limit], revision_row)
                .map_err(|e| self.db(e))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|e| self.db(e))
        })?;
        rows.into_iter().map(|r| self.row_to_info(r)).collect()
    }

    fn revision(&self, number: Revision) -> Result<(RevisionInfo, Vec<Change>), StoreError> {
        let n = number.0 as i64;
        let (row, versions) = self.with_conn(|c| {
            let row = c
                .query_row(
                    &format!("SELECT {REVISION_COLUMNS} FROM revisions WHERE number = ?1"),
                    [n],
                    revision_row,
                )
                .optional()
                .map_err(|e| self.db(e))?
                .ok_or(StoreError::NoSuchRevision(number))?;
            // The versions this revision closed (before) and opened (after).
            let mut stmt = c
                .prepare_cached(
                    "SELECT kind, name, body, valid_from FROM resources
                     WHERE valid_from = ?1 OR valid_to = ?1",
                )
                .map_err(|e| self.db(e))?;
            let versions = stmt
                .query_map([n], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)? == n,
                    ))
                })
                .map_err(|e| self.db(e))?
                .collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|e| self.db(e))?;
            Ok((row, versions))
        })?;
        let mut by_key: std::collections::BTreeMap<ResourceKey, (Option<Value>, Option<Value>)> =
            Default::default();
        for (kind, name, body, opened) in versions {
            let key = self.parse_key(&kind, name)?;
            let body = self.parse_body(&body)?;
            let slot = by_key.entry(key).or_default();
            if opened {
                slot.1 = Some(body);
            } else {
                slot.0 = Some(body);
            }
        }
        let changes = by_key
            .into_iter()
            .map(|(key, (before, after))| {
                let action = match (&before, &after) {
                    (None, _) => ChangeAction::Created,
                    (Some(_), Some(_)) => ChangeAction::Updated,
                    (Some(_), None) => ChangeAction::Deleted,
                };
                Change {
                    key,
                    action,
                    before,
                    after,
                }
            })
            .collect();
        Ok((self.row_to_info(row)?, changes))
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.with_conn(|c| {
            let mut stmt = c
                .prepare_cached("SELECT name, hash FROM tokens ORDER BY name")
                .map_err(|e| self.db(e))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(TokenRecord {
                        name: r.get(0)?,
                        hash: r.get(1)?,
                    })
                })
                .map_err(|e| self.db(e))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
                .map_err(|e| self.db(e))
        })
    }

    fn put_token(&self, token: &TokenRecord) -> Result<(), StoreError> {
        self.with_conn(|c| {
            let tx = c.transaction().map_err(|e| self.db(e))?;
            tx.execute(
                "DELETE FROM tokens WHERE name = ?1 OR hash = ?2",
                params![token.name, token.hash],
            )
            .map_err(|e| self.db(e))?;
            tx.execute(
                "INSERT INTO tokens (name, hash, created_at) VALUES (?1, ?2, ?3)",
                params![token.name, token.hash, now_rfc3339()],
            )
            .map_err(|e| self.db(e))?;
            tx.commit().map_err(|e| self.db(e))
        })
    }

    fn describe(&self) -> String {
        format!("sqlite:{}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn write(kind: Kind, name: &str, body: Option<Value>) -> (ResourceKey, Option<Value>) {
        (ResourceKey::new(kind, name), body)
    }

    fn rev(parent: u64, writes: Vec<(ResourceKey, Option<Value>)>) -> NewRevision {
        NewRevision {
            parent: Revision(parent),
            author: "test".into(),
            message: String::new(),
            operation: Operation::Apply,
            rollback_of: None,
            writes,
        }
    }

    #[test]
    fn revisions_keep_history_and_reject_a_moved_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("p.db")).unwrap();
        assert_eq!(store.head().unwrap(), Revision(0));
        let r1 = store
            .commit(rev(
                0,
                vec![write(Kind::Service, "a", Some(json!({"v": 1})))],
            ))
            .unwrap();
        assert_eq!((r1.number, r1.created), (Revision(1), 1));
        let r2 = store
            .commit(rev(
                1,
                vec![
                    write(Kind::Service, "a", Some(json!({"v": 2}))),
                    write(Kind::Service, "b", Some(json!({"v": 1}))),
                ],
            ))
            .unwrap();
        assert_eq!((r2.created, r2.updated), (1, 1));
        let r3 = store
            .commit(rev(2, vec![write(Kind::Service, "a", None)]))
            .unwrap();
        assert_eq!(r3.deleted, 1);

        assert_eq!(store.load(Revision(1)).unwrap().len(), 1);
        assert_eq!(store.load(Revision(2)).unwrap().len(), 2);
        let at3 = store.load(Revision(3)).unwrap();
        assert_eq!(at3.len(), 1);
        assert_eq!(at3[0].0.name, "b");

        let (_, changes) = store.revision(Revision(2)).unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].action, ChangeAction::Updated);
        assert_eq!(changes[0].before, Some(json!({"v": 1})));

        let err = store
            .commit(rev(2, vec![write(Kind::Service, "c", Some(json!({})))]))
            .unwrap_err();
        assert!(matches!(
            err,
            StoreError::HeadMoved {
                actual: Revision(3),
                ..
            }
        ));
        assert_eq!(
            store.head().unwrap(),
            Revision(3),
            "a rejected commit writes nothing"
        );

        let listed = store.revisions(2, None).unwrap();
        assert_eq!(
            listed.iter().map(|r| r.number.0).collect::<Vec<_>>(),
            vec![3, 2]
        );
        assert!(matches!(
            store.revision(Revision(9)),
            Err(StoreError::NoSuchRevision(_))
        ));
    }

    #[test]
    fn reopening_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.db");
        {
            let store = SqliteStore::open(&path).unwrap();
            store
                .commit(rev(0, vec![write(Kind::Api, "x", Some(json!({"a": 1})))]))
                .unwrap();
            store
                .put_token(&TokenRecord {
                    name: "admin".into(),
                    hash: "sha256:00".into(),
                })
                .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(store.head().unwrap(), Revision(1));
        assert_eq!(store.tokens().unwrap().len(), 1);
    }
}
