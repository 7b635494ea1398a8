//! Reading the YAML text: values the `serde` layer leaves raw (durations, listen addresses),
//! the nesting depth checked before the parser sees the text, and locating a key or a parser
//! error as `file:line:col` so every configuration error points at the mistake.

use std::time::Duration;

use serde_yaml::Value;

use super::ConfigError;

/// `127.0.0.1:9090`, `[::1]:9090` or `:9090` (loopback): metrics are not for the network
/// unless the operator names a non-loopback address.
pub(super) fn listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    let full = match text.strip_prefix(':') {
        Some(port) => format!("127.0.0.1:{port}"),
        None => text.to_string(),
    };
    full.parse().map_err(|_| {
        format!("`{text}` is not a listen address such as `127.0.0.1:9090` or `:9090`")
    })
}

pub(super) fn duration_value(v: &Value) -> Result<Duration, String> {
    match v {
        Value::String(s) => parse_duration(s),
        Value::Number(_) => Err("needs a unit, as in `30s`, `5m` or `1h`".into()),
        _ => Err("expected a duration such as `200ms`, `30s`, `5m` or `1h`".into()),
    }
}

/// Parses `200ms`, `30s`, `5m`, `1h`, `24h` and sums like `1h30m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not a duration such as `200ms`, `30s`, `5m` or `1h`");
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        total = unit
            .checked_mul(u32::try_from(n).map_err(|_| bad())?)
            .and_then(|d| total.checked_add(d))
            .ok_or_else(bad)?;
        rest = &rest[unit_len..];
    }
    if total.is_zero() {
        return Err(format!("`{text}` must be longer than zero"));
    }
    Ok(total)
}

/// Where the text first nests collections deeper than `limit`, as a 1-based line and column.
/// Counts flow brackets (`[`, `{`) outside quoted scalars and comments, plus the block
/// levels that indentation and `- ` entries open; an overestimate only refuses files far
/// deeper than any configuration, an underestimate only leaves the parser to do its work.
pub(super) fn too_deep(text: &str, limit: usize) -> Option<(usize, usize)> {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    for (number, line) in text.lines().enumerate() {
        let content = line.trim_start_matches(' ');
        let mut indent = line.len() - content.len();
        if flow == 0 && !content.is_empty() && !content.starts_with('#') {
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
            // `- - - x` opens one sequence per dash on a single line.
            let mut rest = content;
            while let Some(after) = rest.strip_prefix("- ") {
                indent += 2;
                indents.push(indent);
                rest = after.trim_start_matches(' ');
            }
            if indents.len() > limit {
                return Some((number + 1, indent + 1));
            }
        }
        let mut quote: Option<char> = None;
        let mut previous = ' ';
        for (col, c) in line.char_indices() {
            match quote {
                Some(q) if c == q => quote = None,
                Some(_) => {}
                None => match c {
                    '#' if previous == ' ' => break,
                    '"' | '\'' if matches!(previous, ' ' | '[' | '{' | ',' | ':') => {
                        quote = Some(c)
                    }
                    '[' | '{' => {
                        flow += 1;
                        if flow + indents.len() > limit {
                            return Some((number + 1, col + 1));
                        }
                    }
                    ']' | '}' => flow = flow.saturating_sub(1),
                    _ => {}
                },
            }
            previous = c;
        }
    }
    None
}

/// Rewrites the YAML parser's `path: message at line L column C` as `name:L:C: path: message`.
pub(super) fn yaml_error(name: &str, e: &serde_yaml::Error) -> ConfigError {
    let text = e.to_string();
    let message = match text.rfind(" at line ") {
        Some(i) => &text[..i],
        None => &text,
    };
    match e.location() {
        Some(loc) => ConfigError(format!("{name}:{}:{}: {message}", loc.line(), loc.column())),
        None => ConfigError(format!("{name}: {message}")),
    }
}

/// The 1-based line and column of the key at `path` in block-style YAML.
pub(super) fn locate(text: &str, path: &[&str]) -> Option<(usize, usize)> {
    let mut stack: Vec<(usize, &str)> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let content = line.trim_start();
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = line.len() - content.len();
        let Some((key, _)) = content.split_once(':') else {
            continue;
        };
        let key = key.trim().trim_matches(['"', '\'']);
        while stack.last().is_some_and(|&(i, _)| i >= indent) {
            stack.pop();
        }
        stack.push((indent, key));
        if stack.len() == path.len() && stack.iter().map(|(_, k)| *k).eq(path.iter().copied()) {
            return Some((number + 1, indent + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86_400));
        for bad in ["", "30", "s", "5x", "1.5s", "-1s", "0s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
