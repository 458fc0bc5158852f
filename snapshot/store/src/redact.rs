//! Credentials never reach a message: every error text from the object-store client passes
//! through [`Secrets::redact`], which blanks the secret values this process configured.

#[derive(Clone, Default)]
pub(crate) struct Secrets(Vec<String>);

/// Shorter values would blank ordinary words; real keys are 16+ characters.
const MIN_SECRET_LEN: usize = 8;

impl Secrets {
    pub fn new(values: impl IntoIterator<Item = Option<String>>) -> Self {
        Secrets(
            values
                .into_iter()
                .flatten()
                .filter(|v| v.len() >= MIN_SECRET_LEN)
                .collect(),
        )
    }

    pub fn redact(&self, text: &str) -> String {
        self.0.iter().fold(text.to_string(), |text, secret| {
            text.replace(secret.as_str(), "[redacted]")
        })
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} redacted)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_configured_secret() {
        let secrets = Secrets::new([Some("AKIDEXAMPLE123".into()), Some("short".into()), None]);
        assert_eq!(
            secrets.redact("key AKIDEXAMPLE123 and short"),
            "key [redacted] and short"
        );
        assert!(!format!("{secrets:?}").contains("AKID"));
    }
}
