//! Firecracker's logging flags on dormouse's `tracing` output, and `PUT /logger`: the filter
//! and the formatting layer are reloadable and the destination switchable, so a pre-boot
//! `PUT /logger` changes level, module, level/origin prefixes and file.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};
use vmm_fc_api::types::Logger;
use vmm_fc_api::LogControl;

use super::FirecrackerArgs;

/// Firecracker's level names (case-insensitive) as `tracing` filters.
fn filter(level: &str) -> anyhow::Result<&'static str> {
    Ok(match level.to_ascii_lowercase().as_str() {
        "error" => "error",
        "warning" | "warn" => "warn",
        "info" => "info",
        "debug" => "debug",
        "trace" => "trace",
        "off" => "off",
        _ => bail!("--level {level:?}: expected Error, Warning, Info, Debug, Trace or Off"),
    })
}

/// The filter for `level`, limited to `module` (a Rust module path) when given.
fn directives(level: &str, module: Option<&str>) -> Result<String, String> {
    let level = filter(level).map_err(|e| e.to_string())?;
    let Some(module) = module else {
        return Ok(level.to_string());
    };
    // A module path only: anything else would be read as more filter directives.
    let valid = !module.is_empty()
        && module.len() <= 256
        && module.split("::").all(|part| {
            !part.is_empty() && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        });
    if !valid {
        return Err(format!(
            "module {module:?} is not a module path (like vmm::vm or devices::virtio::block)"
        ));
    }
    Ok(format!("off,{module}={level}"))
}

/// Where log lines go; `PUT /logger` can switch it. Each event is one `write`.
#[derive(Clone)]
struct Target(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for Target {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

impl<'a> fmt::MakeWriter<'a> for Target {
    type Writer = Target;

    fn make_writer(&'a self) -> Target {
        self.clone()
    }
}

type Filtered = Layered<reload::Layer<EnvFilter, Registry>, Registry>;
type Format = fmt::Layer<Filtered, fmt::format::DefaultFields, fmt::format::Format, Target>;

fn format(show_level: bool, show_origin: bool, target: Target) -> Format {
    fmt::layer()
        .with_target(false)
        .with_level(show_level)
        .with_file(show_origin)
        .with_line_number(show_origin)
        .with_ansi(false)
        .with_writer(target)
}

/// The process's log, reconfigurable by `PUT /logger`.
pub struct Logging {
    filter: reload::Handle<EnvFilter, Registry>,
    format: reload::Handle<Format, Filtered>,
    target: Target,
}

pub fn init(args: &FirecrackerArgs) -> anyhow::Result<Logging> {
    let level = filter(args.level.as_deref().unwrap_or("Info"))?;
    let out: Box<dyn Write + Send> = match &args.log_path {
        Some(path) => Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("--log-path {}", path.display()))?,
        ),
        None => Box::new(std::io::stderr()),
    };
    let target = Target(Arc::new(Mutex::new(out)));
    let (filter_layer, filter) = reload::Layer::new(EnvFilter::new(level));
    let (format_layer, format_handle) = reload::Layer::new(format(
        args.show_level,
        args.show_log_origin,
        target.clone(),
    ));
    Registry::default()
        .with(filter_layer)
        .with(format_layer)
        .try_init()
        .context("setting up the log")?;
    Ok(Logging {
        filter,
        format: format_handle,
        target,
    })
}

impl LogControl for Logging {
    /// Firecracker's defaults for absent fields (level Info, no prefixes, all modules); an
    /// absent `log_path` keeps the current destination.
    fn configure(&self, logger: &Logger) -> Result<(), String> {
        let filter = directives(
            logger.level.as_deref().unwrap_or("Info"),
            logger.module.as_deref(),
        )?;
        let filter = EnvFilter::try_new(&filter).map_err(|e| format!("log filter: {e}"))?;
        // Open before changing anything: a bad path leaves the log as it was.
        let out = match &logger.log_path {
            Some(path) => Some(
                OpenOptions::new()
                    .create(true)
                    .read(true)
                    .append(true)
                    // As Firecracker: a named pipe opens without a reader, and never blocks.
                    .custom_flags(libc::O_NONBLOCK)
                    .open(path)
                    .map_err(|e| format!("Cannot open the log file {path}: {e}"))?,
            ),
            None => None,
        };
        if let Some(file) = out {
            *self.target.0.lock().unwrap_or_else(|e| e.into_inner()) = Box::new(file);
        }
        let layer = format(
            logger.show_level.unwrap_or(false),
            logger.show_log_origin.unwrap_or(false),
            self.target.clone(),
        );
        self.format
            .reload(layer)
            .map_err(|e| format!("reloading the log format: {e}"))?;
        self.filter
            .reload(filter)
            .map_err(|e| format!("reloading the log filter: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::directives;

    #[test]
    fn firecracker_level_names_map_to_tracing_filters() {
        assert_eq!(super::filter("Warning").unwrap(), "warn");
        assert_eq!(super::filter("off").unwrap(), "off");
        assert_eq!(super::filter("TRACE").unwrap(), "trace");
        assert!(super::filter("verbose").is_err());
    }

    #[test]
    fn a_module_limits_the_log_to_that_path() {
        assert_eq!(directives("Debug", None).unwrap(), "debug");
        assert_eq!(
            directives("warning", Some("vmm::vm")).unwrap(),
            "off,vmm::vm=warn"
        );
        for bad in ["", "vmm,devices=trace", "vmm::", "a b", "x=debug"] {
            let err = directives("Info", Some(bad)).unwrap_err();
            assert!(err.contains("not a module path"), "{bad:?}: {err}");
        }
        assert!(directives("loud", None)
            .unwrap_err()
            .contains("expected Error"));
    }
}
