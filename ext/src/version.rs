//! `multidb_version()`: which build of the extension is loaded.

use sqlite_loadable::prelude::*;
use sqlite_loadable::{api, Result};

/// `multidb_version()` → text such as `v0.1.0`.
pub fn multidb_version(
    context: *mut sqlite3_context,
    _values: &[*mut sqlite3_value],
) -> Result<()> {
    api::result_text(context, format!("v{}", crate::VERSION))?;
    Ok(())
}
