//! The image's defaults for every process the agent starts: a container image's `Env`,
//! `WorkingDir` and `User`, written by `deploy/build-rootfs.sh --from oci:…` into
//! [`EXEC_DEFAULTS_FILE`]. A request's own values win: its `env` entries over the image's,
//! its `cwd` and `user` when set; `clear_env` drops the image's environment too.
//!
//! The format is a line per setting, `#` comments and blank lines ignored:
//! `env KEY=VALUE`, `cwd /absolute/path`, `user NAME_OR_UID[:GROUP_OR_GID]`.

use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use crate::proto::ProcessSpec;

/// Where the image keeps its defaults.
pub const EXEC_DEFAULTS_FILE: &str = "/etc/dormouse/exec-defaults";

/// Read at most this much of the file (a real one is a few hundred bytes; the rest is ignored
/// with a warning).
const MAX_FILE_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecDefaults {
    /// In file order; a later line for the same key wins.
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<String>,
}

impl ExecDefaults {
    /// Parses the file's text; returns the defaults and one message per line it skipped.
    pub fn parse(text: &str) -> (Self, Vec<String>) {
        let mut defaults = Self::default();
        let mut skipped = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim_end_matches('\r');
            if line.trim().is_empty() || line.trim_start().starts_with('#') {
                continue;
            }
            let (keyword, value) = line.split_once(' ').unwrap_or((line, ""));
            let accepted = match keyword {
                "env" => match value.split_once('=') {
                    Some((key, value)) if valid_env_key(key) && !value.contains('\0') => {
                        defaults.env.retain(|(existing, _)| existing != key);
                        defaults.env.push((key.to_owned(), value.to_owned()));
                        true
                    }
                    _ => false,
                },
                "cwd" if value.starts_with('/') && !value.contains('\0') => {
                    defaults.cwd = Some(value.to_owned());
                    true
                }
                "user" if !value.is_empty() && !value.contains(['\0', ' ']) => {
                    defaults.user = Some(value.to_owned());
                    true
                }
                _ => false,
            };
            if !accepted {
                skipped.push(format!(
                    "{EXEC_DEFAULTS_FILE} line {}: not understood: `{}`",
                    number + 1,
                    line.chars().take(80).collect::<String>()
                ));
            }
        }
        (defaults, skipped)
    }

    /// Reads `path`: no file means no defaults.
    pub fn load(path: &Path) -> (Self, Vec<String>) {
        let mut text = String::new();
        let read = std::fs::File::open(path)
            .and_then(|file| file.take(MAX_FILE_BYTES).read_to_string(&mut text));
        match read {
            Ok(_) => {
                let (defaults, mut messages) = Self::parse(&text);
                if text.len() as u64 >= MAX_FILE_BYTES {
                    messages.push(format!(
                        "{} is longer than {MAX_FILE_BYTES} bytes: the rest is ignored",
                        path.display()
                    ));
                }
                (defaults, messages)
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => (Self::default(), vec![]),
            Err(err) => (
                Self::default(),
                vec![format!("cannot read {}: {err}", path.display())],
            ),
        }
    }

    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }

    /// `spec` with the defaults filled in where it leaves them open.
    pub fn apply(&self, spec: &ProcessSpec) -> ProcessSpec {
        let mut spec = spec.clone();
        if spec.user.is_empty() {
            if let Some(user) = &self.user {
                spec.user = user.clone();
            }
        }
        if spec.cwd.is_empty() {
            if let Some(cwd) = &self.cwd {
                spec.cwd = cwd.clone();
            }
        }
        if !spec.clear_env {
            for (key, value) in &self.env {
                spec.env.entry(key.clone()).or_insert_with(|| value.clone());
            }
        }
        spec
    }
}

fn valid_env_key(key: &str) -> bool {
    !key.is_empty() && !key.contains(['=', '\0'])
}

static INSTALLED: OnceLock<ExecDefaults> = OnceLock::new();

/// The defaults of this guest's image, read once (at start-up: see `AgentConfig::detect`, so a
/// template's clones never read the file again).
pub fn installed() -> &'static ExecDefaults {
    INSTALLED.get_or_init(|| {
        let (defaults, messages) = ExecDefaults::load(Path::new(EXEC_DEFAULTS_FILE));
        for message in messages {
            tracing::warn!("{message}");
        }
        if !defaults.is_empty() {
            tracing::info!(
                env = defaults.env.len(),
                cwd = ?defaults.cwd,
                user = ?defaults.user,
                "image exec defaults"
            );
        }
        defaults
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# from the image config\n\
        env PATH=/usr/local/bin:/usr/bin:/bin\n\
        env GREETING=hello from oci\n\
        env EMPTY=\n\
        env GREETING=hello again\n\
        cwd /work\n\
        user sandbox:1000\n\
        \n\
        bogus line\n\
        env =nokey\n\
        cwd relative\n";

    #[test]
    fn parses_the_file_and_reports_what_it_skips() {
        let (defaults, skipped) = ExecDefaults::parse(FILE);
        assert_eq!(
            defaults.env,
            [
                ("PATH".to_owned(), "/usr/local/bin:/usr/bin:/bin".to_owned()),
                ("EMPTY".to_owned(), String::new()),
                ("GREETING".to_owned(), "hello again".to_owned()),
            ]
        );
        assert_eq!(defaults.cwd.as_deref(), Some("/work"));
        assert_eq!(defaults.user.as_deref(), Some("sandbox:1000"));
        assert_eq!(skipped.len(), 3, "{skipped:?}");
        assert!(skipped[0].contains("line 9"), "{skipped:?}");
    }

    #[test]
    fn requests_win_over_the_image() {
        let (defaults, _) = ExecDefaults::parse(FILE);
        let open = ProcessSpec {
            command: "env".into(),
            env: [("GREETING".to_owned(), "mine".to_owned())].into(),
            ..ProcessSpec::default()
        };
        let applied = defaults.apply(&open);
        assert_eq!(applied.user, "sandbox:1000");
        assert_eq!(applied.cwd, "/work");
        assert_eq!(applied.env["GREETING"], "mine");
        assert_eq!(applied.env["PATH"], "/usr/local/bin:/usr/bin:/bin");

        let explicit = ProcessSpec {
            command: "env".into(),
            user: "root".into(),
            cwd: "/".into(),
            clear_env: true,
            ..ProcessSpec::default()
        };
        let applied = defaults.apply(&explicit);
        assert_eq!(applied.user, "root");
        assert_eq!(applied.cwd, "/");
        assert!(
            applied.env.is_empty(),
            "clear_env drops the image's env too"
        );
    }

    #[test]
    fn missing_file_means_no_defaults_and_size_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let (defaults, messages) = ExecDefaults::load(&dir.path().join("none"));
        assert!(defaults.is_empty() && messages.is_empty());

        let big = dir.path().join("big");
        let mut text = "env A=1\n".to_owned();
        text.push_str(&"# padding\n".repeat(10_000));
        text.push_str("env B=2\n");
        std::fs::write(&big, text).unwrap();
        let (defaults, messages) = ExecDefaults::load(&big);
        assert_eq!(defaults.env, [("A".to_owned(), "1".to_owned())]);
        assert!(messages.iter().any(|m| m.contains("longer than")));
    }
}
