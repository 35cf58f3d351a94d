//! Whether a projection's read model may be read now: the fail-fast check a query calls so that an
//! in-place rebuild's window is designed rather than discovered (invariant 4 and section 6.4 of
//! DESIGN.md).

use crate::handoff::{self, CrossedHandoff};
use crate::pg::error::{required_text, ArgError, SqlError};
use crate::pg::spi::{self, Snap, Stmt};
use crate::registry::{self, ProjectionMode, RegistryError, Status};
use pgrx::pg_sys;
use pgrx::prelude::*;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(transparent)]
    Arg(#[from] ArgError),
    #[error(transparent)]
    Registry(RegistryError),
    #[error("projection \"{projection}\" is not ready: it is {}{}", .status.as_str(), in_parentheses(.progress))]
    NotReady { projection: String, status: Status, progress: Option<String> },
}

/// ` (progress)`, or nothing without one.
fn in_parentheses(progress: &Option<String>) -> String {
    progress.as_ref().map(|p| format!(" ({p})")).unwrap_or_default()
}

impl SqlError for StatusError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            StatusError::Arg(e) => e.sqlstate(),
            StatusError::Registry(e) => e.sqlstate(),
            StatusError::NotReady { .. } => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        }
    }
    fn hint(&self) -> Option<String> {
        match self {
            StatusError::NotReady { status: Status::Stale | Status::Failed, .. } => Some(
                "Start a rebuild with ep_rebuild(...) (or ep_retry_projection for a failed async projection).".into(),
            ),
            StatusError::NotReady { .. } => Some("Wait for the rebuild (ep_rebuild_wait) and query again.".into()),
            _ => None,
        }
    }
}

static STATUS_AS_SEEN: Stmt =
    Stmt { sql: "SELECT status FROM ep.projections WHERE id = $1", types: &[pg_sys::INT4OID] };

static PROGRESS: Stmt = Stmt {
    sql: "SELECT pg_catalog.format('%s of %s events replayed', r.events_done, COALESCE(r.events_total::text, '?')) \
          FROM ep.rebuilds r WHERE r.projection_id = $1 AND r.status IN ('queued', 'running')",
    types: &[pg_sys::INT4OID],
};

/// `ep_require_ready`: true, or an error (55000) saying what the projection is doing. Under
/// REPEATABLE READ or SERIALIZABLE, also 40001 when a hand-off (a rebuild's switch) committed after
/// the transaction's snapshot: the names in the query would resolve to tables the snapshot sees
/// only partly.
pub fn require_ready(name: Option<&str>) -> Result<bool, StatusError> {
    let name = required_text(name, "projection")?;
    let mut p = registry::by_name(name).ok_or_else(|| StatusError::Registry(RegistryError::Unknown(name.into())))?;
    // The status as the calling query's snapshot sees it: at READ COMMITTED a hand-off (Rf) can
    // commit after the query's snapshot was taken and before this call, and then the latest
    // status says `active` while the query reads the model without the hand-off's catch-up (the
    // randomized histories found exactly that). Not there at all: registered after the snapshot.
    let seen: Option<String> = crate::pg::catalog::read(|| {
        Spi::connect(|client| spi::exec(client, &STATUS_AS_SEEN, &[p.id.into_datum()], Snap::Caller, 0).get(0, 1))
    });
    p.status = seen.as_deref().and_then(Status::parse).unwrap_or(Status::Rebuilding);
    let ready = match p.mode {
        ProjectionMode::Inline | ProjectionMode::Async => p.status == Status::Active,
    };
    if !ready {
        let progress = crate::pg::catalog::read(|| {
            Spi::connect(|client| {
                spi::exec(client, &PROGRESS, &[p.id.into_datum()], Snap::Latest, 0).get::<String>(0, 1)
            })
        });
        return Err(StatusError::NotReady { projection: p.name, status: p.status, progress });
    }
    if handoff::uses_transaction_snapshot() && handoff::first_crossed(&[(p.id, p.generation, &p.name)]).is_some() {
        crate::pg::error::raise(&CrossedHandoff { projection: p.name });
    }
    Ok(true)
}

/// `ep_projection_ready`: the same question without raising.
pub fn is_ready(name: Option<&str>) -> Result<bool, StatusError> {
    let name = required_text(name, "projection")?;
    let p = registry::by_name(name).ok_or_else(|| StatusError::Registry(RegistryError::Unknown(name.into())))?;
    Ok(p.status == Status::Active)
}
