//! The YAML configuration: `Config::parse` must answer Ok or a located error for any text,
//! never panic and never take long (libFuzzer's `-timeout` catches the slow ones).
//!
//! Input: UTF-8 text (other bytes are skipped). A first line `#pattern: P` also passes `P` as
//! the `--pattern` override, so both ways of giving a pattern are exercised.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multidb_agent::config::{parse_duration, Config};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let pattern = text
        .lines()
        .next()
        .and_then(|line| line.strip_prefix("#pattern: "));
    match Config::parse(text, "fuzz.yml", pattern) {
        Ok(config) => {
            let m = &config.multi_db;
            assert!(m.max_active > 0, "max_active 0 accepted");
            assert!(!m.scan_interval.is_zero() && !m.sync_interval.is_zero());
        }
        Err(e) => {
            // Every error names the file it is about.
            let message = e.to_string();
            assert!(
                message.starts_with("fuzz.yml") || message.starts_with("--pattern"),
                "unlocated error: {message}"
            );
        }
    }
    // The duration syntax on its own, as every interval key reaches it.
    if text.len() < 64 {
        let _ = parse_duration(text);
    }
});
