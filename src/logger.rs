//! Ledge's logger: lines on stderr by default, or appended to a file, with the level and line
//! format changeable at run time (the API's `PUT /logger`).
//!
//! It is opt-in: the `ledge` binary calls `init`; a program embedding the library keeps its own
//! logger, and then `configure` says so instead of changing anything.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// Errors configuring the logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    #[error("another logger is installed: the embedding program owns logging")]
    NotOurs,
    #[error("cannot open log file {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

struct Format {
    show_level: bool,
    show_origin: bool,
}

struct LedgeLogger {
    out: Mutex<Box<dyn Write + Send>>,
    format: Mutex<Format>,
}

static LOGGER: OnceLock<LedgeLogger> = OnceLock::new();

impl log::Log for LedgeLogger {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &log::Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let f = self.format.lock().unwrap_or_else(|e| e.into_inner());
        let mut line = String::from("ledge: ");
        if f.show_level {
            line.push_str(&r.level().as_str().to_lowercase());
            line.push_str(": ");
        }
        if f.show_origin {
            line.push_str(&format!(
                "{}:{}: ",
                r.file().unwrap_or("?"),
                r.line().unwrap_or(0)
            ));
        }
        drop(f);
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        // A log line that cannot be written has nowhere better to go.
        let _ = writeln!(out, "{line}{}", r.args());
    }

    fn flush(&self) {
        let _ = self.out.lock().unwrap_or_else(|e| e.into_inner()).flush();
    }
}

/// Installs Ledge's logger on stderr at `level`. Returns false if another logger was there.
pub fn init(level: log::LevelFilter) -> bool {
    let logger = LOGGER.get_or_init(|| LedgeLogger {
        out: Mutex::new(Box::new(std::io::stderr())),
        format: Mutex::new(Format {
            show_level: true,
            show_origin: false,
        }),
    });
    let ok = log::set_logger(logger).is_ok();
    if ok {
        log::set_max_level(level);
    }
    ok
}

/// Changes where lines go and what they show; `None` keeps the current setting.
pub fn configure(
    path: Option<&Path>,
    level: Option<log::LevelFilter>,
    show_level: Option<bool>,
    show_origin: Option<bool>,
) -> Result<(), LoggerError> {
    let logger = LOGGER.get().ok_or(LoggerError::NotOurs)?;
    if let Some(p) = path {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|source| LoggerError::Open {
                path: p.to_path_buf(),
                source,
            })?;
        *logger.out.lock().unwrap_or_else(|e| e.into_inner()) = Box::new(file);
    }
    {
        let mut f = logger.format.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(v) = show_level {
            f.show_level = v;
        }
        if let Some(v) = show_origin {
            f.show_origin = v;
        }
    }
    if let Some(l) = level {
        log::set_max_level(l);
    }
    Ok(())
}
