//! `ep_forget_subject` (DESIGN.md, section 18): the subject's key is destroyed, and every event
//! sealed under it reads as the redacted shape from then on, in reads and replays alike.

use super::LogError;
use crate::pg::catalog;
use crate::pg::error::required_text;

/// Forgets `subject`; returns how many events of the log were sealed under its key (0 when it
/// had none: forgetting is idempotent).
pub fn forget_subject(subject: Option<&str>) -> Result<i64, LogError> {
    let subject = required_text(subject, "subject")?;
    // A handler forgetting a subject would change, under the projection being applied, what the
    // events after this one replay as: read models would no longer follow the log.
    if crate::sandbox::in_user_code() {
        return Err(LogError::ForgetInsideHandler);
    }
    let cat = catalog::require();
    if crate::seal::columns(&cat).is_none() {
        return Err(LogError::NeedsUpdate { feature: "subjects", version: "0.5.0" });
    }
    let by = crate::sandbox::role_name(catalog::current_user()).unwrap_or_default();
    Ok(crate::seal::forget(&cat, subject, &by))
}
