//! S3 credentials: from the environment or given explicitly, never logged, and scrubbed from
//! every message that leaves the S3 replica.

use super::*;

/// Keys of an S3 replica. `Debug` shows none of them.
#[derive(Clone)]
pub struct S3Credentials {
    pub(super) access_key_id: String,
    pub(super) secret_access_key: String,
    pub(super) session_token: Option<String>,
}

impl S3Credentials {
    /// Explicit keys; an empty session token counts as none.
    pub fn new(
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
        session_token: Option<String>,
    ) -> S3Credentials {
        S3Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: session_token.filter(|t| !t.is_empty()),
        }
    }

    /// `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, with `AWS_SESSION_TOKEN` if set.
    /// The error names the missing variables, never a value.
    pub fn from_env() -> Result<S3Credentials, String> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    pub(super) fn from_lookup(
        get: impl Fn(&str) -> Option<String>,
    ) -> Result<S3Credentials, String> {
        let get = |name: &str| get(name).filter(|v| !v.is_empty());
        let access = get("AWS_ACCESS_KEY_ID");
        let secret = get("AWS_SECRET_ACCESS_KEY");
        match (access, secret) {
            (Some(access), Some(secret)) => {
                Ok(S3Credentials::new(access, secret, get("AWS_SESSION_TOKEN")))
            }
            (access, secret) => {
                let missing: Vec<&str> = [
                    (access.is_none(), "AWS_ACCESS_KEY_ID"),
                    (secret.is_none(), "AWS_SECRET_ACCESS_KEY"),
                ]
                .into_iter()
                .filter_map(|(missing, name)| missing.then_some(name))
                .collect();
                Err(format!(
                    "no S3 credentials: set {} in the environment",
                    missing.join(" and ")
                ))
            }
        }
    }

    /// Every secret string, for scrubbing messages.
    pub(super) fn secrets(&self) -> impl Iterator<Item = &str> {
        [
            Some(self.access_key_id.as_str()),
            Some(self.secret_access_key.as_str()),
            self.session_token.as_deref(),
        ]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
    }
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &"[redacted]")
            .field("secret_access_key", &"[redacted]")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// `text` with every credential string replaced.
pub(super) fn scrub(credentials: &S3Credentials, text: &str) -> String {
    credentials
        .secrets()
        .fold(text.to_string(), |text, secret| {
            text.replace(secret, "[redacted]")
        })
}
