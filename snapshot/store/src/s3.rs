//! A store in S3-compatible object storage (`s3://bucket/prefix`) through `object_store`.
//! Configuration comes from the standard AWS environment variables; requests that fail for
//! transient reasons are retried with bounded exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{BackoffConfig, ClientOptions, RetryConfig};

use crate::backend::{delegate_store, ObjectBackend};
use crate::error::{Result, StoreError};
use crate::redact::Secrets;

/// Connection settings, normally from the environment ([`S3Config::from_env`]). Its `Debug`
/// shows no secret.
#[derive(Clone, Default)]
pub struct S3Config {
    /// `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT`): a custom endpoint, e.g. `http://127.0.0.1:8333`.
    pub endpoint: Option<String>,
    /// `AWS_REGION` (or `AWS_DEFAULT_REGION`); `us-east-1` if unset.
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// `AWS_ALLOW_HTTP=true`: plain HTTP endpoints (local test servers).
    pub allow_http: bool,
    pub retry: RetryPolicy,
}

/// How often and how long a failing request is retried.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    pub max_retries: usize,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Gives up retrying a request after this long, whatever `max_retries` says.
    pub timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            timeout: Duration::from_secs(120),
        }
    }
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field(
                "credentials",
                &self.access_key_id.as_ref().map(|_| "[redacted]"),
            )
            .field("allow_http", &self.allow_http)
            .field("retry", &self.retry)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl S3Config {
    pub fn from_env() -> Self {
        S3Config {
            endpoint: env("AWS_ENDPOINT_URL").or_else(|| env("AWS_ENDPOINT")),
            region: env("AWS_REGION").or_else(|| env("AWS_DEFAULT_REGION")),
            access_key_id: env("AWS_ACCESS_KEY_ID"),
            secret_access_key: env("AWS_SECRET_ACCESS_KEY"),
            session_token: env("AWS_SESSION_TOKEN"),
            allow_http: env("AWS_ALLOW_HTTP").is_some_and(|v| v == "true" || v == "1"),
            retry: RetryPolicy::default(),
        }
    }
}

pub struct S3Store(ObjectBackend);

impl S3Store {
    pub fn new(bucket: &str, prefix: &str, config: &S3Config) -> Result<Self> {
        let label = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let secrets = Secrets::new([
            config.access_key_id.clone(),
            config.secret_access_key.clone(),
            config.session_token.clone(),
        ]);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(config.region.as_deref().unwrap_or("us-east-1"))
            .with_allow_http(config.allow_http)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: config.retry.initial_backoff,
                    max_backoff: config.retry.max_backoff,
                    base: 2.0,
                },
                max_retries: config.retry.max_retries,
                retry_timeout: config.retry.timeout,
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(config.allow_http)
                    .with_connect_timeout(Duration::from_secs(10))
                    .with_timeout(Duration::from_secs(120)),
            );
        if let Some(endpoint) = &config.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if let Some(key) = &config.access_key_id {
            builder = builder.with_access_key_id(key);
        }
        if let Some(secret) = &config.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        if let Some(token) = &config.session_token {
            builder = builder.with_token(token);
        }
        let inner = builder.build().map_err(|e| StoreError::Config {
            store: label.clone(),
            message: secrets.redact(&e.to_string()),
        })?;
        Ok(S3Store(ObjectBackend {
            inner: Arc::new(inner),
            prefix: prefix.to_string(),
            label,
            secrets,
        }))
    }
}

delegate_store!(S3Store);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    #[tokio::test]
    async fn errors_and_debug_output_carry_no_credentials() {
        // A port nothing listens on: every request fails after its (short) retries.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = S3Config {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            region: None,
            access_key_id: Some("AKIDSECRETACCESSKEY1".into()),
            secret_access_key: Some("wJalrXUtnFEMIsecretSECRETkey".into()),
            session_token: Some("SESSIONtokenSECRET99".into()),
            allow_http: true,
            retry: RetryPolicy {
                max_retries: 1,
                initial_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(2),
                timeout: Duration::from_secs(5),
            },
        };
        let store = S3Store::new("bucket", "p", &config).unwrap();
        let started = std::time::Instant::now();
        let err = store.get("chunks/x", 1 << 20).await.unwrap_err();
        // Retried, but bounded: a refused connection does not hang the caller.
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let shown = format!("{err} {err:?} {store:?} {config:?}");
        assert!(shown.contains("s3://bucket/p"), "{shown}");
        for secret in [
            "AKIDSECRETACCESSKEY1",
            "wJalrXUtnFEMIsecretSECRETkey",
            "SESSIONtokenSECRET99",
        ] {
            assert!(!shown.contains(secret), "{secret} leaked: {shown}");
        }
    }
}
