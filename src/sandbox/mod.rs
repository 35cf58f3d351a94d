//! The sandbox every piece of user code runs in: inline and async handlers, registration builds,
//! rebuild replays, setup functions, and the extension's DDL on a user's read model.
//!
//! User code runs only as the projection's owner, never as the caller or the worker's superuser,
//! with the read-model schema first and `pg_temp` last on its search_path, after a check at the
//! time of the call that the owner may still execute it, and leaves the session as it found it
//! (DESIGN.md, "Threat model"). In a worker, a call that runs longer than
//! `event_projections.handler_timeout` is cancelled, and the worker process ends if the code
//! catches the cancel.

pub mod handler;
pub mod replay;

use crate::pg::catalog::PINNED_PATH;
use crate::pg::error::SqlError;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

thread_local! {
    /// How many `run_as` calls are running (user code calling back into the extension nests).
    static USER_CODE: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
}

/// Counts one `run_as` for its lifetime; an error unwinding through it counts it out.
struct UserCode;
impl UserCode {
    fn enter() -> Self {
        USER_CODE.with(|d| d.set(d.get() + 1));
        UserCode
    }
}
impl Drop for UserCode {
    fn drop(&mut self) {
        USER_CODE.with(|d| d.set(d.get().saturating_sub(1)));
    }
}

/// Whether a handler (or other user code run by the extension) is running in this backend: what
/// must not happen from inside one (a stream deletion under the event it is applying) checks it.
pub fn in_user_code() -> bool {
    USER_CODE.with(|d| d.get() > 0)
}

/// Runs `f` as `role` with `search_path`, leaving the session exactly as it was:
/// - the user id is `role`, with `SECURITY_RESTRICTED_OPERATION` set, so the code cannot change
///   the session's role, create temporary objects, open cursors WITH HOLD or LISTEN (what
///   PostgreSQL forbids in index expressions run by maintenance commands, for the same reason);
/// - every setting the code changes, with `SET`, `SET LOCAL` or `set_config`, is undone when it
///   returns: `AtEOXact_GUC(false, ..)` rolls back every change made at the nest level opened
///   here, which is what `CREATE INDEX` does after running the table owner's code;
/// - `search_path` is the one given (`handler_path` puts `pg_temp` last).
///
/// On an error the enclosing (sub)transaction's abort restores the user and the settings.
pub fn run_as<R>(role: pg_sys::Oid, search_path: &str, f: impl FnOnce() -> R) -> R {
    let _inside = UserCode::enter();
    let path = CString::new(search_path).unwrap_or_else(|_| CString::new(PINNED_PATH).expect("static"));
    let mut saved_user = pg_sys::Oid::INVALID;
    let mut saved_sec: i32 = 0;
    // SAFETY: reads and writes of the backend's user id and GUC nesting, inside a transaction
    // (every caller runs in one); what is saved here is put back below, and an error in between
    // is cleaned up by the abort of the (sub)transaction, as for a SECURITY DEFINER function.
    let nest = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_sec);
        let nest = pg_sys::NewGUCNestLevel();
        pg_sys::SetUserIdAndSecContext(
            role,
            saved_sec | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32,
        );
        crate::pg::backend::set_setting(c"search_path", &path, pg_sys::GucAction::GUC_ACTION_SAVE);
        nest
    };
    let r = f();
    // SAFETY: as above; `nest` is the level opened above, not closed yet.
    unsafe {
        pg_sys::AtEOXact_GUC(false, nest);
        pg_sys::SetUserIdAndSecContext(saved_user, saved_sec);
    }
    r
}

// ------------------------------------------------------------------------------------------------
// search_path

/// The elements of a `search_path` value, as PostgreSQL splits it: comma separated, each either a
/// bare word (folded to lower case) or a double-quoted identifier (`""` inside is a quote).
/// Returns None for a value PostgreSQL would not accept either (an unterminated quote).
pub fn split_path(path: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut chars = path.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let mut item = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        item.push('"');
                    }
                    '"' => break,
                    c => item.push(c),
                }
            }
            out.push(item);
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' || c.is_whitespace() {
                    break;
                }
                // PostgreSQL folds only ASCII letters of a bare identifier (UTF-8 databases).
                item.push(c.to_ascii_lowercase());
                chars.next();
            }
            // "$user" is written bare in the default path; keep it as PostgreSQL reads it.
            out.push(item);
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.next() {
            None => return Some(out),
            Some(',') => continue,
            Some(_) => return None,
        }
    }
}

/// One search_path element that PostgreSQL reads back as exactly `name`: always double-quoted,
/// with `"` doubled. A quoted element is never folded or taken for a keyword, so no keyword list
/// is needed (PostgreSQL compares `$user` and `pg_temp` after removing the quotes).
fn quote_path_item(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether a search_path element names the temporary schema (`pg_temp`, or `pg_temp_N`).
fn is_temp_schema(item: &str) -> bool {
    item == "pg_temp"
        || item.strip_prefix("pg_temp_").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The search_path a handler (or setup function) runs with: the read-model schema `schema` first,
/// then the elements of the path recorded at registration, then `pg_temp` last, wherever the
/// recorded path had it (so that no role that can append, and so owns temporary tables in its
/// session, can shadow a read-model table). Every element is double-quoted (`quote_path_item`),
/// so the result is one value PostgreSQL parses back into exactly these schemas.
pub fn handler_path(schema: Option<&str>, registered_path: &str) -> String {
    let mut items: Vec<String> = Vec::new();
    if let Some(s) = schema {
        items.push(quote_path_item(s));
    }
    for item in split_path(registered_path).unwrap_or_default() {
        if is_temp_schema(&item) || item.is_empty() {
            continue;
        }
        items.push(quote_path_item(&item));
    }
    items.push(quote_path_item("pg_temp"));
    items.join(", ")
}

// ------------------------------------------------------------------------------------------------
// The checks at the time of the call

/// Why user code may not run now.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The function was dropped (only possible through a path the drop guard does not see).
    #[error("the {what} of projection \"{projection}\" does not exist any more")]
    NoFunction { what: String, projection: String },
    /// The function lives in a temporary schema.
    #[error("function {function} of projection \"{projection}\" is temporary and cannot run")]
    Temporary { function: String, projection: String },
    /// The owner lost EXECUTE on the function.
    #[error(
        "permission denied for function {function}: role \"{owner}\", the owner of projection \"{projection}\", may not execute it"
    )]
    NoExecute { function: String, owner: String, projection: String },
    /// The owner role no longer exists.
    #[error("the owner role of projection \"{projection}\" does not exist any more")]
    NoOwner { projection: String },
}

impl SqlError for SandboxError {
    fn sqlstate(&self) -> PgSqlErrorCode {
        match self {
            SandboxError::NoFunction { .. } => PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
            SandboxError::Temporary { .. } => PgSqlErrorCode::ERRCODE_INVALID_FUNCTION_DEFINITION,
            SandboxError::NoExecute { .. } => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            SandboxError::NoOwner { .. } => PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        }
    }
    fn hint(&self) -> Option<String> {
        let projection = match self {
            SandboxError::NoFunction { projection, .. }
            | SandboxError::Temporary { projection, .. }
            | SandboxError::NoExecute { projection, .. }
            | SandboxError::NoOwner { projection } => projection,
        };
        Some(match self {
            SandboxError::NoExecute { function, owner, .. } => format!(
                "GRANT EXECUTE ON FUNCTION {function} TO {}, or SELECT ep_unregister_projection('{}').",
                pgrx::spi::quote_identifier(owner),
                projection.replace('\'', "''")
            ),
            _ => {
                format!("SELECT ep_unregister_projection('{}') and register it again.", projection.replace('\'', "''"))
            }
        })
    }
}

/// `role`'s name, for messages.
pub fn role_name(role: pg_sys::Oid) -> Option<String> {
    // SAFETY: a syscache lookup by OID; with noerr = true it returns NULL for a missing role.
    unsafe {
        let p = pg_sys::GetUserNameFromId(role, true);
        (!p.is_null()).then(|| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned())
    }
}

/// Whether a function exists, and whether it lives in a temporary schema.
fn function_state(function: pg_sys::Oid) -> Option<bool> {
    // SAFETY: syscache lookups by OID; get_func_namespace returns InvalidOid for a missing function.
    unsafe {
        let nsp = pg_sys::get_func_namespace(function);
        (nsp != pg_sys::Oid::INVALID).then(|| pg_sys::isAnyTempNamespace(nsp))
    }
}

/// Checks, at the time of the call, that `owner` may run `function` for `projection`: the owner
/// exists, the function exists, is not temporary, and the owner may EXECUTE it.
pub fn may_run(function: pg_sys::Oid, what: &str, owner: pg_sys::Oid, projection: &str) -> Result<(), SandboxError> {
    let Some(owner_name) = role_name(owner) else {
        return Err(SandboxError::NoOwner { projection: projection.into() });
    };
    match function_state(function) {
        None => return Err(SandboxError::NoFunction { what: what.into(), projection: projection.into() }),
        Some(true) => {
            return Err(SandboxError::Temporary {
                function: crate::pg::catalog::regprocedure_text(function),
                projection: projection.into(),
            })
        }
        Some(false) => {}
    }
    if !crate::pg::catalog::may_execute(owner, function) {
        return Err(SandboxError::NoExecute {
            function: crate::pg::catalog::regprocedure_text(function),
            owner: owner_name,
            projection: projection.into(),
        });
    }
    Ok(())
}

// ------------------------------------------------------------------------------------------------
// Runaway user code in the worker

/// `utils/timeout.h`, which pgrx does not bind.
mod timeout {
    pub type TimeoutId = std::ffi::c_int;
    /// `USER_TIMEOUT` of PostgreSQL 15's `TimeoutId`: the first id an extension may register.
    pub const USER_TIMEOUT: TimeoutId = 12;
    unsafe extern "C-unwind" {
        pub fn RegisterTimeout(id: TimeoutId, handler: Option<unsafe extern "C-unwind" fn()>) -> TimeoutId;
        pub fn enable_timeout_after(id: TimeoutId, delay_ms: std::ffi::c_int);
        pub fn disable_timeout(id: TimeoutId, keep_indicator: bool);
    }
}

/// How long code that caught the cancel gets before the worker process is ended.
const GRACE_MS: i32 = 1000;

static CANCEL_ID: AtomicI32 = AtomicI32::new(-1);
static DIE_ID: AtomicI32 = AtomicI32::new(-1);
/// Set by the first timer: the current call was cancelled for running too long.
static TIMED_OUT: AtomicBool = AtomicBool::new(false);

/// The first timer, in signal context: a query cancel, as `statement_timeout` raises one.
unsafe extern "C-unwind" fn on_handler_timeout() {
    TIMED_OUT.store(true, Ordering::SeqCst);
    // SAFETY: what PostgreSQL's own timeout handlers do: set interrupt flags (sig_atomic_t) and the
    // process latch, both async-signal-safe.
    unsafe {
        pg_sys::QueryCancelPending = 1;
        pg_sys::InterruptPending = 1;
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

/// The second timer: the code caught the cancel and went on. A FATAL cannot be caught.
unsafe extern "C-unwind" fn on_handler_grace_over() {
    crate::handoff::inflight::note_timed_out();
    // SAFETY: as above; ProcDiePending makes the next CHECK_FOR_INTERRUPTS end the process.
    unsafe {
        pg_sys::ProcDiePending = 1;
        pg_sys::InterruptPending = 1;
        pg_sys::SetLatch(pg_sys::MyLatch);
    }
}

/// Registers the two timers (once, in a worker process).
pub fn init_worker_timeouts() {
    // SAFETY: RegisterTimeout with USER_TIMEOUT hands out a free id; InitializeTimeouts has run
    // (StartBackgroundWorker does it before calling the worker's main function).
    unsafe {
        CANCEL_ID.store(timeout::RegisterTimeout(timeout::USER_TIMEOUT, Some(on_handler_timeout)), Ordering::SeqCst);
        DIE_ID.store(timeout::RegisterTimeout(timeout::USER_TIMEOUT, Some(on_handler_grace_over)), Ordering::SeqCst);
    }
}

/// Arms the timers for one call of user code (in a worker; elsewhere a no-op): the user's own
/// `statement_timeout` governs code run in the user's session.
pub fn arm() {
    let (cancel, die) = (CANCEL_ID.load(Ordering::Relaxed), DIE_ID.load(Ordering::Relaxed));
    if cancel < 0 {
        return;
    }
    let ms = crate::pg::settings::handler_timeout_ms();
    if ms <= 0 {
        return;
    }
    TIMED_OUT.store(false, Ordering::SeqCst);
    // SAFETY: ids registered by init_worker_timeouts in this process.
    unsafe {
        timeout::enable_timeout_after(cancel, ms);
        timeout::enable_timeout_after(die, ms.saturating_add(GRACE_MS));
    }
}

/// Disarms the timers after a call of user code returned (or failed).
pub fn disarm() {
    let (cancel, die) = (CANCEL_ID.load(Ordering::Relaxed), DIE_ID.load(Ordering::Relaxed));
    if cancel < 0 {
        return;
    }
    // SAFETY: ids registered by init_worker_timeouts in this process.
    unsafe {
        timeout::disable_timeout(cancel, false);
        timeout::disable_timeout(die, false);
    }
}

/// Whether the last call of user code was cancelled for running longer than the timeout (and
/// forgets it).
pub fn take_timed_out() -> bool {
    TIMED_OUT.swap(false, Ordering::SeqCst)
}

/// Runs `f` (a call of user code) with the timers armed, disarming them however it ends.
pub fn with_timeout<R>(f: impl FnOnce() -> R) -> R {
    struct Disarm;
    impl Drop for Disarm {
        fn drop(&mut self) {
            disarm();
        }
    }
    arm();
    let _d = Disarm;
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn paths_put_pg_temp_last() {
        assert_eq!(handler_path(Some("bal"), "\"$user\", public"), "\"bal\", \"$user\", \"public\", \"pg_temp\"");
        assert_eq!(handler_path(Some("Bal"), "pg_temp, public"), "\"Bal\", \"public\", \"pg_temp\"");
        assert_eq!(handler_path(None, "pg_temp_3,x"), "\"x\", \"pg_temp\"");
        assert_eq!(handler_path(Some("a\"b"), ""), "\"a\"\"b\", \"pg_temp\"");
        assert_eq!(handler_path(Some("select"), "public"), "\"select\", \"public\", \"pg_temp\"");
    }

    fn ident() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z_][a-z0-9_]{0,10}",
            "[ -~]{1,12}",
            "[a-zA-Zäöü\"',.; ]{1,12}",
            Just("pg_temp".to_string()),
            Just("pg_temp_7".to_string()),
            Just("$user".to_string()),
            Just("select".to_string()),
        ]
    }

    /// A registered path element as a user may have written it: bare when PostgreSQL would read
    /// the bare word back as the name (keywords included: search_path does not parse them),
    /// double-quoted otherwise.
    fn as_written(name: &str) -> String {
        let bare = name.chars().next().is_some_and(|c| c.is_ascii_lowercase() || c == '_' || c == '$')
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
        if bare {
            name.to_string()
        } else {
            quote_path_item(name)
        }
    }

    /// A bare element keeps its non-ASCII letters as they are, as PostgreSQL's parser does.
    #[test]
    fn bare_elements_fold_ascii_only() {
        assert_eq!(split_path("Äbc, ABC"), Some(vec!["Äbc".to_string(), "abc".to_string()]));
    }

    proptest! {
        /// Whatever the names, and however the registered path wrote them: the path parses back
        /// into the schema, the registered elements other than pg_temp in order, and pg_temp, last
        /// and once; and every element of it is quoted.
        #[test]
        fn handler_path_round_trips(schema in proptest::option::of(ident()), items in proptest::collection::vec(ident(), 0..5)) {
            let registered = items.iter().map(|i| as_written(i)).collect::<Vec<_>>().join(", ");
            let path = handler_path(schema.as_deref(), &registered);
            let parsed = split_path(&path).expect("the path parses");
            let mut expected: Vec<String> = schema.iter().cloned().collect();
            expected.extend(items.iter().filter(|i| !is_temp_schema(i) && !i.is_empty()).cloned());
            expected.push("pg_temp".into());
            let quoted: Vec<String> = expected.iter().map(|e| quote_path_item(e)).collect();
            prop_assert_eq!(&path, &quoted.join(", "));
            prop_assert_eq!(parsed, expected);
        }

        /// A quoted element is always one element that parses back to the name.
        #[test]
        fn quoting_round_trips(name in ident()) {
            prop_assert_eq!(split_path(&quote_path_item(&name)), Some(vec![name]));
        }
    }
}
