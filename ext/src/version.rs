//! `multidb_version()`: which build of the extension is loaded.

use sqlite_loadable::prelude::*;
use sqlite_loadable::{api, Error, Result};

/// `multidb_version()` → text such as `v0.1.0`.
pub fn multidb_version(context: *mut sqlite3_context, values: &[*mut sqlite3_value]) -> Result<()> {
    crate::guard("multidb_version", || {
        if !values.is_empty() {
            return Err(Error::new_message("multidb_version: takes no arguments"));
        }
        api::result_text(context, format!("v{}", crate::VERSION))
    })
}
