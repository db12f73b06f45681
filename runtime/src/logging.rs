//! A `log` backend for every zygote process: one line per record on stderr, tagged with the
//! process that wrote it (`supervisor`, `zygote`, `owner 0`, `worker 3`, ...) and its pid.
//!
//! A forked child calls [`set_tag`] first thing, so its lines never carry its parent's name.
//! The level comes from `ZYGOTE_LOG` (`error`, `warn`, `info` (default), `debug`, `trace`).

use std::io::Write;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{Level, LevelFilter, Log, Metadata, Record};

static TAG: Mutex<String> = Mutex::new(String::new());

struct Logger;

static LOGGER: Logger = Logger;

impl Log for Logger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let tag = TAG.lock().map(|t| t.clone()).unwrap_or_default();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs();
        let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        let line = format!(
            "{h:02}:{m:02}:{s:02}.{:03} {level} [{tag} {}] {}\n",
            now.subsec_millis(),
            std::process::id(),
            record.args()
        );
        // One write per line, so lines of different processes sharing stderr do not interleave.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// Installs the logger (once per process image) and sets the tag.
pub fn init(tag: &str) {
    set_tag(tag);
    if log::set_logger(&LOGGER).is_ok() {
        let level = std::env::var("ZYGOTE_LOG")
            .ok()
            .and_then(|v| v.parse::<LevelFilter>().ok())
            .unwrap_or(LevelFilter::Info);
        log::set_max_level(level);
    }
}

/// Changes the tag of this process's lines (a forked child calls this first).
pub fn set_tag(tag: &str) {
    if let Ok(mut t) = TAG.lock() {
        t.clear();
        t.push_str(tag);
    }
}
