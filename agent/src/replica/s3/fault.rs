//! A failed S3 request, classified (retry or not), described without secrets, and the
//! jittered backoff between attempts.

use super::*;

/// One failed request, classified.
#[derive(Debug)]
pub(super) struct Fault {
    /// HTTP status, when the server answered.
    pub(super) status: Option<u16>,
    /// S3's error code (`NoSuchKey`, `SlowDown`, …) when the body had one.
    pub(super) code: Option<String>,
    pub(super) detail: String,
    pub(super) retryable: bool,
    pub(super) attempts: u32,
}

impl Fault {
    pub(super) fn of(error: &S3Error) -> Fault {
        match error {
            S3Error::HttpFailWithBody(status, body) => {
                let code = xml_text(body, "Code").map(str::to_string);
                let detail = match xml_text(body, "Message") {
                    Some(message) => message.to_string(),
                    None if code.is_some() => String::new(),
                    None => excerpt(body),
                };
                Fault {
                    status: Some(*status),
                    code,
                    detail,
                    // A 2xx here is an error document inside a 200 answer, which AWS says
                    // to retry (CompleteMultipartUpload).
                    retryable: *status >= 500 || *status == 429 || *status < 300,
                    attempts: 1,
                }
            }
            // Connection refused or reset, timeouts, a response cut short: the request may
            // well pass on a new connection. A permanent transport error (a wrong host name)
            // costs only the backoff time to find out.
            S3Error::Atto(_) | S3Error::Io(_) => Fault {
                retryable: true,
                ..Fault::message(transport_detail(&error.to_string()))
            },
            other => Fault::message(other.to_string()),
        }
    }

    pub(super) fn message(detail: String) -> Fault {
        Fault {
            status: None,
            code: None,
            detail,
            retryable: false,
            attempts: 1,
        }
    }

    /// `HTTP 503 SlowDown: Please reduce your request rate. (after 5 attempts)`.
    pub(super) fn describe(&self) -> String {
        let mut text = match (self.status, &self.code) {
            (Some(status), Some(code)) => format!("HTTP {status} {code}"),
            (Some(status), None) => format!("HTTP {status}"),
            (None, _) => String::new(),
        };
        if !self.detail.is_empty() {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&self.detail);
        }
        if self.attempts > 1 {
            text.push_str(&format!(" (after {} attempts)", self.attempts));
        }
        text
    }
}

/// A transport error as a user reads it: a read that timed out surfaces from the socket as
/// `EAGAIN` ("Resource temporarily unavailable"), which says nothing about a store that
/// accepted the connection and never answered.
fn transport_detail(text: &str) -> String {
    let timed_out = text.contains("(os error 11)")
        || text.contains("(os error 110)")
        || text.to_ascii_lowercase().contains("timed out");
    if timed_out {
        format!("timed out: the store sent no answer within 30 s ({text})")
    } else {
        text.to_string()
    }
}

/// The text of the first `<tag>…</tag>` in an S3 error body. Only `Code` and `Message` are
/// read: other elements (`StringToSign`, `AWSAccessKeyId`, …) may carry credentials.
pub(super) fn xml_text<'a>(body: &'a str, tag: &str) -> Option<&'a str> {
    let start = body.find(&format!("<{tag}>"))? + tag.len() + 2;
    let len = body[start..].find(&format!("</{tag}>"))?;
    Some(body[start..start + len].trim())
}

/// The start of a non-XML body, on one line.
pub(super) fn excerpt(body: &str) -> String {
    let line: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(ERROR_EXCERPT_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// Delay before S3 retry number `retry` (1 = the first retry), [`crate::time::backoff`]
/// between [`BACKOFF_BASE`] and [`BACKOFF_CAP`].
pub(super) fn backoff(retry: u32, random: u64) -> Duration {
    crate::time::backoff(retry, BACKOFF_BASE, BACKOFF_CAP, random)
}

pub(super) use crate::time::random_u64;

#[cfg(test)]
mod tests {
    use super::transport_detail;

    #[test]
    fn a_read_that_timed_out_says_so() {
        let eagain = "attohttpc: Io Error: Resource temporarily unavailable (os error 11)";
        let text = transport_detail(eagain);
        assert!(
            text.starts_with("timed out: the store sent no answer within 30 s")
                && text.contains(eagain),
            "{text}"
        );
        let refused = "attohttpc: Io Error: Connection refused (os error 111)";
        assert_eq!(transport_detail(refused), refused);
    }
}
