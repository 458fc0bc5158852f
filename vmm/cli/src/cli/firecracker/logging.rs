//! Firecracker's logging flags on dormouse's `tracing` output.

use std::sync::Mutex;

use anyhow::{bail, Context};

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

pub fn init(args: &FirecrackerArgs) -> anyhow::Result<()> {
    let level = filter(args.level.as_deref().unwrap_or("Info"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(level))
        .with_target(false)
        .with_level(args.show_level)
        .with_file(args.show_log_origin)
        .with_line_number(args.show_log_origin)
        .with_ansi(false);
    match &args.log_path {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("--log-path {}", path.display()))?;
            builder.with_writer(Mutex::new(file)).init();
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn firecracker_level_names_map_to_tracing_filters() {
        assert_eq!(super::filter("Warning").unwrap(), "warn");
        assert_eq!(super::filter("off").unwrap(), "off");
        assert_eq!(super::filter("TRACE").unwrap(), "trace");
        assert!(super::filter("verbose").is_err());
    }
}
