//! The raw SQLite calls sqlite-loadable has no wrapper for (WAL hook, commit hook,
//! auto-extension, checkpoints, connection config), made through the `sqlite3_api_routines`
//! table the entry point receives. Each function returns a neutral value when the table or
//! the routine is missing, so callers never have to unwrap.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use sqlite_loadable::prelude::{sqlite3, sqlite3_api_routines};

static API: AtomicPtr<sqlite3_api_routines> = AtomicPtr::new(ptr::null_mut());

pub const SQLITE_OK: c_int = 0;
pub const SQLITE_OK_LOAD_PERMANENTLY: c_int = 256;
pub const SQLITE_CHECKPOINT_PASSIVE: c_int = 0;
pub const SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE: c_int = 1006;

pub type WalHook = unsafe extern "C" fn(*mut c_void, *mut sqlite3, *const c_char, c_int) -> c_int;
pub type CommitHook = unsafe extern "C" fn(*mut c_void) -> c_int;
pub type EntryPoint =
    unsafe extern "C" fn(*mut sqlite3, *mut *mut c_char, *const sqlite3_api_routines) -> c_int;

/// Remembers the routine table; every later call goes through it.
pub fn set(api: *mut sqlite3_api_routines) {
    if !api.is_null() {
        API.store(api, Ordering::Release);
    }
}

fn api() -> Option<&'static sqlite3_api_routines> {
    let p = API.load(Ordering::Acquire);
    // SAFETY: SQLite's routine table is a static that lives as long as the process.
    unsafe { p.as_ref() }
}

/// Installs `hook` as the WAL hook of `db` with `arg` as its argument.
///
/// # Safety
/// `db` must be an open connection.
pub unsafe fn wal_hook(db: *mut sqlite3, hook: Option<WalHook>, arg: *mut c_void) {
    if let Some(f) = api().and_then(|a| a.wal_hook) {
        // SAFETY: `db` is open (caller's contract); the hook has the signature SQLite expects.
        unsafe { f(db, hook, arg) };
    }
}

/// Installs (or with `None` removes) the commit hook of `db`.
///
/// # Safety
/// `db` must be an open connection.
pub unsafe fn commit_hook(db: *mut sqlite3, hook: Option<CommitHook>, arg: *mut c_void) {
    if let Some(f) = api().and_then(|a| a.commit_hook) {
        // SAFETY: as above.
        unsafe { f(db, hook, arg) };
    }
}

/// Registers `entry` to run for every connection the process opens from now on.
pub fn auto_extension(entry: EntryPoint) -> c_int {
    match api().and_then(|a| a.auto_extension) {
        // SAFETY: SQLite stores the pointer and later calls it with the signature of an
        // extension entry point, which `entry` has; the API erases it to `void(*)(void)`.
        Some(f) => unsafe {
            f(Some(std::mem::transmute::<
                EntryPoint,
                unsafe extern "C" fn(),
            >(entry)))
        },
        None => 1,
    }
}

/// The file name of database `schema` of `db` (empty for in-memory and temporary ones).
///
/// # Safety
/// `db` must be open and `schema` a valid C string or null; the returned slice lives as long
/// as the connection keeps that database attached.
pub unsafe fn db_filename<'a>(db: *mut sqlite3, schema: *const c_char) -> &'a [u8] {
    let Some(f) = api().and_then(|a| a.db_filename) else {
        return &[];
    };
    // SAFETY: `db` is open; SQLite returns null or a NUL-terminated string it owns.
    let name = unsafe { f(db, schema) };
    if name.is_null() {
        return &[];
    }
    // SAFETY: non-null, NUL-terminated, owned by the connection (see above).
    unsafe { CStr::from_ptr(name) }.to_bytes()
}

/// Runs a PASSIVE checkpoint of `schema`, as SQLite's own auto-checkpoint does.
///
/// # Safety
/// `db` must be open; may be called from inside the WAL hook.
pub unsafe fn checkpoint_passive(db: *mut sqlite3, schema: *const c_char) {
    if let Some(f) = api().and_then(|a| a.wal_checkpoint_v2) {
        // SAFETY: `db` is open; null out-pointers are allowed.
        unsafe {
            f(
                db,
                schema,
                SQLITE_CHECKPOINT_PASSIVE,
                ptr::null_mut(),
                ptr::null_mut(),
            )
        };
    }
}

/// Sets `SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE` on `db`.
///
/// # Safety
/// `db` must be open.
pub unsafe fn set_no_checkpoint_on_close(db: *mut sqlite3, on: bool) {
    if let Some(f) = api().and_then(|a| a.db_config) {
        // SAFETY: this option takes an int and an int* (null allowed), as passed here.
        unsafe {
            f(
                db,
                SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
                c_int::from(on),
                ptr::null_mut::<c_int>(),
            )
        };
    }
}

/// The connection a function call runs on.
///
/// # Safety
/// `context` must be the context SQLite passed to the running function.
pub unsafe fn context_db_handle(
    context: *mut sqlite_loadable::prelude::sqlite3_context,
) -> *mut sqlite3 {
    match api().and_then(|a| a.context_db_handle) {
        // SAFETY: valid context of a running function (caller's contract).
        Some(f) => unsafe { f(context) },
        None => ptr::null_mut(),
    }
}
