//! The thread-local last-error message, the panic guard every export runs in, and the
//! log callback.

use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{OnceLock, RwLock};

use super::bindings as b;
use super::status::{self, FfiResult, Status};

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn to_cstring(text: &str) -> CString {
    // Interior NULs cannot cross the C boundary; show them as U+FFFD.
    CString::new(text.replace('\0', "\u{fffd}")).unwrap_or_default()
}

fn set_last_error(message: &str) {
    let c = (!message.is_empty()).then(|| to_cstring(message));
    LAST_ERROR.with(|slot| *slot.borrow_mut() = c);
}

/// Pointer to this thread's last error message, `""` when there is none (valid until
/// it is replaced).
pub(crate) fn last_error_ptr() -> *const c_char {
    LAST_ERROR.with(|slot| match &*slot.borrow() {
        Some(c) => c.as_ptr(),
        None => c"".as_ptr(),
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Runs the body of the export `name`: clears the last error, catches panics, and
/// turns a failure into its status code and message.
pub(crate) fn guard(name: &str, body: impl FnOnce() -> FfiResult) -> Status {
    set_last_error("");
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => status::OK,
        Ok(Err(f)) => {
            let message = format!("{name}: {}", f.message);
            log::debug!("{message}");
            set_last_error(&message);
            f.status
        }
        Err(payload) => {
            let message = format!(
                "{name}: internal error (caught panic: {})",
                panic_message(payload.as_ref())
            );
            set_last_error(&message);
            status::INTERNAL
        }
    }
}

/// Runs the body of an export that cannot report errors, returning `fallback` if it
/// panics.
pub(crate) fn guard_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// The C log callback and its user data.
#[derive(Clone, Copy)]
struct Sink {
    callback: unsafe extern "C" fn(i32, *const c_char, *const c_char, *mut c_void),
    user_data: *mut c_void,
}

// SAFETY: the header documents that the callback may be called from any thread with
// the user data given to hp_log_set; making that thread-safe is the caller's part of
// the contract. The library itself only copies the pointer.
unsafe impl Send for Sink {}
// SAFETY: as for `Send`: the sink is only read, and calls are allowed from any thread.
unsafe impl Sync for Sink {}

static SINK: RwLock<Option<Sink>> = RwLock::new(None);
/// Whether our logger is the process's `log` logger (set on the first hp_log_set).
static INSTALLED: OnceLock<bool> = OnceLock::new();

struct CLogger;

static LOGGER: CLogger = CLogger;

fn level_code(level: log::Level) -> i32 {
    (match level {
        log::Level::Error => b::hp_log_level_HP_LOG_ERROR,
        log::Level::Warn => b::hp_log_level_HP_LOG_WARN,
        log::Level::Info => b::hp_log_level_HP_LOG_INFO,
        log::Level::Debug => b::hp_log_level_HP_LOG_DEBUG,
        log::Level::Trace => b::hp_log_level_HP_LOG_TRACE,
    }) as i32
}

impl log::Log for CLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        SINK.read().map(|s| s.is_some()).unwrap_or(false)
    }

    fn log(&self, record: &log::Record<'_>) {
        let Ok(guard) = SINK.read() else { return };
        let Some(sink) = *guard else { return };
        let target = to_cstring(record.target());
        let message = to_cstring(&record.args().to_string());
        // SAFETY: the callback was given to hp_log_set as a valid function of this
        // signature (the header's contract); both strings are NUL-terminated and
        // outlive the call.
        unsafe {
            (sink.callback)(
                level_code(record.level()),
                target.as_ptr(),
                message.as_ptr(),
                sink.user_data,
            )
        };
    }

    fn flush(&self) {}
}

/// Installs (or removes, with `None`) the log callback.
pub(crate) fn set_log_sink(callback: b::hp_log_callback, user_data: *mut c_void) -> FfiResult {
    let ours = *INSTALLED.get_or_init(|| log::set_logger(&LOGGER).is_ok());
    if !ours {
        return Err(status::Failure::new(
            status::UNSUPPORTED,
            "another logger for the Rust `log` crate is already installed in this process",
        ));
    }
    let sink = callback.map(|callback| Sink {
        callback,
        user_data,
    });
    let mut slot = SINK.write().unwrap_or_else(|e| e.into_inner());
    *slot = sink;
    log::set_max_level(if slot.is_some() {
        log::LevelFilter::Trace
    } else {
        log::LevelFilter::Off
    });
    Ok(())
}

/// A NUL-terminated `&'static` string as a C pointer.
pub(crate) fn static_str(s: &'static CStr) -> *const c_char {
    s.as_ptr()
}
