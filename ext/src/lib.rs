//! `libmultidb`: the SQLite loadable extension of multidb.
//!
//! This file only registers the SQL functions; each family lives in its own module.
//! The entry point is `sqlite3_multidb_init`, so `.load ./target/release/libmultidb`
//! works in the `sqlite3` shell.

mod version;

use std::os::raw::{c_char, c_int};

use sqlite_loadable::prelude::*;
use sqlite_loadable::{define_scalar_function, FunctionFlags};

/// The SQL functions this extension adds, in the order they are registered.
/// Tests compare this list with what the `sqlite3` shell sees after `.load`.
pub const SQL_FUNCTIONS: &[&str] = &["multidb_version"];

/// The extension's version, as `multidb_version()` reports it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn register(db: *mut sqlite3) -> sqlite_loadable::Result<()> {
    let flags = FunctionFlags::UTF8 | FunctionFlags::DETERMINISTIC;
    define_scalar_function(db, "multidb_version", 0, version::multidb_version, flags)?;
    Ok(())
}

/// Entry point SQLite calls when the library is loaded.
///
/// # Safety
/// Called by SQLite with a valid connection and API routine table.
#[no_mangle]
pub unsafe extern "C" fn sqlite3_multidb_init(
    db: *mut sqlite3,
    pz_err_msg: *mut *mut c_char,
    p_api: *mut sqlite3_api_routines,
) -> c_int {
    let outcome = std::panic::catch_unwind(|| {
        sqlite_loadable::entrypoints::register_entrypoint(db, pz_err_msg, p_api, register)
    });
    match outcome {
        Ok(code) => c_int::try_from(code).unwrap_or(SQLITE_ERROR),
        Err(_) => SQLITE_ERROR,
    }
}

const SQLITE_ERROR: c_int = 1;
