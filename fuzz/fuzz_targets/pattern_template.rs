//! Discovery patterns and replica templates: parse a pattern, match a path against it, parse a
//! template against the pattern's names and expand it, both with the fields the path yields
//! and with arbitrary values, then make the replica location (`url_for`) of both kinds.
//!
//! Input: UTF-8 lines `PATTERN`, `TEMPLATE`, `PATH`, then any number of field values.
//!
//! Besides "no panic", it checks what the parsers promise: a match captures every name once,
//! in order; a value never adds a path separator to an expansion; and a replica location
//! that `url_for` accepts has no empty, `.` or `..` component below its root (issue 10:
//! `/r/.{{tenant}}` with `tenant = .` must not reach `/r/..`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use multidb_agent::config::{ReplicaKind, ReplicaTemplate};
use multidb_agent::discover::pattern::{Fields, Pattern, Template};
use multidb_agent::replica::ReplicaUrl;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let (Some(pattern), template, path) = (lines.next(), lines.next(), lines.next()) else {
        return;
    };
    let values: Vec<&str> = lines.collect();
    let Ok(pattern) = Pattern::new(pattern) else {
        return;
    };
    let names = pattern.names();
    assert!(!names.is_empty(), "a pattern without captures was accepted");
    for segment in pattern.segments() {
        let _ = segment.literal();
    }

    let matched = path.and_then(|path| pattern.parse(path).ok());
    if let Some(fields) = &matched {
        let captured: Vec<&str> = fields.0.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            captured, names,
            "a match must capture every name once, in order"
        );
        assert!(fields
            .0
            .iter()
            .all(|(_, v)| !v.is_empty() && !v.contains('/')));
    }
    let arbitrary = (!values.is_empty()).then(|| {
        Fields(
            names
                .iter()
                .zip(values.iter().cycle())
                .map(|(n, v)| (n.clone(), (*v).to_string()))
                .collect(),
        )
    });

    let Some(template_text) = template else {
        return;
    };
    let Ok(template) = Template::new(template_text, names) else {
        return;
    };
    for fields in [matched, arbitrary].iter().flatten() {
        if let Ok(expanded) = template.expand(fields) {
            assert_eq!(
                expanded.matches('/').count(),
                template_text.matches('/').count(),
                "a value added a path separator: {template_text:?} -> {expanded:?}"
            );
        }
        for kind in [ReplicaKind::File, ReplicaKind::S3] {
            let replica = ReplicaTemplate {
                kind,
                path: template.clone(),
                bucket: Some("bucket".into()),
                region: None,
                endpoint: None,
                force_path_style: false,
                litestream_compatible: false,
            };
            let Ok(url) = replica.url_for(fields) else {
                continue;
            };
            check_location(template_text, &url);
        }
    }
});

/// Every component of an accepted location is a plain name.
fn check_location(template: &str, url: &ReplicaUrl) {
    let location = match url {
        ReplicaUrl::File(path) => path.to_string_lossy().into_owned(),
        ReplicaUrl::S3(s3) => s3.prefix.clone(),
    };
    let body = location.strip_prefix('/').unwrap_or(&location);
    assert!(
        body.split('/').all(|c| !matches!(c, "" | "." | "..")),
        "replica location {location:?} from {template:?} is not canonical"
    );
}
