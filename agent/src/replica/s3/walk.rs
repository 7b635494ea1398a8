//! Every key under a prefix, one ListObjectsV2 page (up to 1,000 keys) at a time: how
//! `restore --all` and `replicas` find many replicas at once, for one request per thousand
//! keys rather than a listing per database and level.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{ReplicaError, S3Replica};

impl S3Replica {
    /// Calls `each(key below this replica's prefix, size, LastModified)` for every object
    /// under the prefix, in key order, so that all keys below one sub-prefix come together.
    /// `each` returns false to stop early. Only one page is held at a time.
    pub fn walk_keys(
        &self,
        each: &mut dyn FnMut(&str, u64, SystemTime) -> bool,
    ) -> Result<(), ReplicaError> {
        let prefix = if self.location.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", self.location.prefix)
        };
        self.each_object(&prefix, each)
    }

    /// Calls `each(key less prefix, size, LastModified)` for every object whose key starts
    /// with `prefix`, page by page, until `each` returns false.
    pub(super) fn each_object(
        &self,
        prefix: &str,
        each: &mut dyn FnMut(&str, u64, SystemTime) -> bool,
    ) -> Result<(), ReplicaError> {
        let mut token = None;
        loop {
            let (page, _) = self
                .retrying("list", prefix, || {
                    self.bucket
                        .list_page(prefix.to_string(), None, token.clone(), None, None)
                })
                .map_err(|fault| self.fail("list", prefix, &fault))?;
            for object in &page.contents {
                let Some(rest) = object.key.strip_prefix(prefix) else {
                    continue;
                };
                let created =
                    crate::time::parse_rfc3339(&object.last_modified).unwrap_or(UNIX_EPOCH);
                if !each(rest, object.size, created) {
                    return Ok(());
                }
            }
            if !page.is_truncated {
                return Ok(());
            }
            // Without a token the next page would be the first again: an endless loop.
            token = Some(
                page.next_continuation_token
                    .ok_or_else(|| ReplicaError::S3 {
                        bucket: self.location.bucket.clone(),
                        key: prefix.to_string(),
                        op: "list",
                        message: "truncated listing without a continuation token".to_string(),
                    })?,
            );
        }
    }
}
