//! `libmultidb`: the SQLite loadable extension of multidb.
//!
//! Loaded into a connection (`.load ./target/release/libmultidb`), it hooks WAL commits and
//! posts one fixed-size record per commit into the shared-memory ring the agent reads, and
//! registers an auto-extension so every connection the process opens later is hooked too.
//! This file only wires things up: the ring layout is in [`ring`] (also used by the agent),
//! the commit path in `hook`, the SQL functions in `status` and `version`.

mod api;
mod connection;
mod hook;
pub mod ring;
mod shared;
mod status;
mod version;
mod wait;

use std::os::raw::{c_char, c_int};
use std::panic::{catch_unwind, AssertUnwindSafe};

use sqlite_loadable::prelude::*;
use sqlite_loadable::{define_scalar_function, Error, FunctionFlags};

/// An SQL function the extension adds.
pub struct SqlFunction {
    pub name: &'static str,
    /// Number of arguments.
    pub args: i32,
    /// Same result for the same arguments (lets SQLite factor calls out of a query).
    pub deterministic: bool,
    body: fn(*mut sqlite3_context, &[*mut sqlite3_value]) -> sqlite_loadable::Result<()>,
}

/// Every SQL function the extension adds, in name order: registration walks this table, and
/// the tests compare it with what the `sqlite3` shell sees after `.load`.
pub const SQL_FUNCTIONS: &[SqlFunction] = &[
    SqlFunction {
        name: "multidb_autocheckpoint",
        args: 1,
        deterministic: false,
        body: status::multidb_autocheckpoint,
    },
    SqlFunction {
        name: "multidb_status",
        args: 0,
        deterministic: false,
        body: status::multidb_status,
    },
    SqlFunction {
        name: "multidb_version",
        args: 0,
        deterministic: true,
        body: version::multidb_version,
    },
    SqlFunction {
        name: "multidb_wait",
        args: 1,
        deterministic: false,
        body: wait::multidb_wait,
    },
];

/// The extension's version, as `multidb_version()` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs an SQL function body, turning a panic into an SQL error: a panic must never cross
/// into SQLite's C frames.
fn guard(
    name: &str,
    body: impl FnOnce() -> sqlite_loadable::Result<()>,
) -> sqlite_loadable::Result<()> {
    catch_unwind(AssertUnwindSafe(body))
        .unwrap_or_else(|_| Err(Error::new_message(&format!("{name}: internal error"))))
}

fn register_functions(db: *mut sqlite3) -> sqlite_loadable::Result<()> {
    for function in SQL_FUNCTIONS {
        let flags = if function.deterministic {
            FunctionFlags::UTF8 | FunctionFlags::DETERMINISTIC
        } else {
            FunctionFlags::UTF8
        };
        define_scalar_function(db, function.name, function.args, function.body, flags)?;
    }
    Ok(())
}

/// Entry point SQLite calls for `.load` / `load_extension`.
///
/// Installs the WAL hook on the loading connection, registers the auto-extension for later
/// connections, and returns `SQLITE_OK_LOAD_PERMANENTLY` so closing this connection does not
/// unload code the auto-extension still points to.
///
/// # Safety
/// Called by SQLite with a valid connection and API routine table.
#[no_mangle]
pub unsafe extern "C" fn sqlite3_multidb_init(
    db: *mut sqlite3,
    pz_err_msg: *mut *mut c_char,
    p_api: *mut sqlite3_api_routines,
) -> c_int {
    let outcome = catch_unwind(|| {
        api::set(p_api);
        hook::init_process();
        let code = sqlite_loadable::entrypoints::register_entrypoint(
            db,
            pz_err_msg,
            p_api,
            register_functions,
        );
        if code != 0 {
            return c_int::try_from(code).unwrap_or(1);
        }
        // SAFETY: SQLite hands the entry point an open connection.
        unsafe { hook::install(db, hook::DEFAULT_AUTOCHECKPOINT) };
        static AUTO: std::sync::Once = std::sync::Once::new();
        AUTO.call_once(|| {
            api::auto_extension(auto_init);
        });
        api::SQLITE_OK_LOAD_PERMANENTLY
    });
    outcome.unwrap_or(1)
}

/// Runs for every connection opened after the extension was loaded.
///
/// # Safety
/// Called by SQLite only, as a registered auto-extension, with the connection being opened.
unsafe extern "C" fn auto_init(
    db: *mut sqlite3,
    _err: *mut *mut c_char,
    _api: *const sqlite3_api_routines,
) -> c_int {
    let outcome = catch_unwind(|| {
        if register_functions(db).is_err() {
            return 1;
        }
        // SAFETY: `db` is the connection being opened; the hook gets it back as its argument.
        unsafe { api::commit_hook(db, Some(hook::first_commit), db.cast()) };
        api::SQLITE_OK
    });
    outcome.unwrap_or(1)
}
