//! Discovery patterns and replica path templates.
//!
//! A pattern such as `/data/*/databases/*/branches/*/tenants/*.db` is split into a literal
//! root (`/data`) and one [`Segment`] per path component below it. Discovery walks the tree
//! segment by segment, so only directories that can still match are ever read; [`Pattern::parse`]
//! turns a path back into its captured fields. Templates (`{{project}}/{{tenant}}`) expand those
//! fields into replica paths and refuse values that could escape the replica root.

use std::fmt;

mod invert;
pub use invert::Inverse;

/// The names given to exactly four plain `*` wildcards, as in the seed's layout.
const SEED_NAMES: [&str; 4] = ["project", "database", "branch", "tenant"];

/// Why a pattern was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PatternError(String);

/// One piece of a path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// A wildcard; the index is into [`Pattern::names`].
    Capture(usize),
}

/// One path component of the pattern below its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    parts: Vec<Part>,
}

impl Segment {
    /// The literal text of a segment without wildcards.
    pub fn literal(&self) -> Option<&str> {
        match self.parts.as_slice() {
            [Part::Literal(text)] => Some(text),
            _ => None,
        }
    }

    /// Whether `name` matches this segment.
    pub fn matches(&self, name: &str) -> bool {
        match_parts(&self.parts, name, &mut |_, _| {})
    }

    /// Matches `name` and reports each capture as `(name index, value)`.
    fn captures<'a>(&self, name: &'a str, out: &mut Vec<(usize, &'a str)>) -> bool {
        let start = out.len();
        let mut found = Vec::new();
        let matched = match_parts(&self.parts, name, &mut |index, value| {
            found.push((index, value))
        });
        if matched {
            out.extend(found);
        } else {
            out.truncate(start);
        }
        matched
    }
}

/// Matches `text` against `parts`; every wildcard matches one or more characters, the
/// shortest that lets the rest match (so `db_{a}_{b}` splits `db_x_y_z` as `x` / `y_z`).
fn match_parts<'a>(parts: &[Part], text: &'a str, emit: &mut dyn FnMut(usize, &'a str)) -> bool {
    match parts.split_first() {
        None => text.is_empty(),
        Some((Part::Literal(lit), rest)) => text
            .strip_prefix(lit.as_str())
            .is_some_and(|tail| match_parts(rest, tail, emit)),
        Some((Part::Capture(index), rest)) => {
            let ends = text.char_indices().map(|(i, c)| i + c.len_utf8());
            for end in ends {
                let (value, tail) = text.split_at(end);
                let mut probe = |_: usize, _: &str| {};
                if match_parts(rest, tail, &mut probe) {
                    emit(*index, value);
                    return match_parts(rest, tail, emit);
                }
            }
            false
        }
    }
}

/// A validated discovery pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    /// Literal directory prefix; empty for a relative pattern that starts with a wildcard.
    root: String,
    segments: Vec<Segment>,
    names: Vec<String>,
}

/// The fields a path yields, in capture order.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Fields(pub Vec<(String, String)>);

impl Fields {
    /// The value captured as `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Fields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

impl Pattern {
    /// Parses and validates a pattern.
    pub fn new(text: &str) -> Result<Pattern, PatternError> {
        let err = |msg: String| Err(PatternError(format!("pattern `{text}`: {msg}")));
        if text.is_empty() {
            return err("is empty".into());
        }
        if text.contains('\0') {
            return err("contains a NUL byte".into());
        }
        if text.ends_with('/') {
            return err("ends with `/`; it must name files".into());
        }
        if let Some(bad) = ["**", "?", "[", "]"].iter().find(|s| text.contains(**s)) {
            let what = if *bad == "**" {
                "recursive `**`".to_string()
            } else {
                format!("glob syntax `{bad}`")
            };
            return err(format!(
                "{what} is not supported; use `*` or `{{name}}` within one segment"
            ));
        }
        let absolute = text.starts_with('/');
        let components: Vec<&str> = text.trim_start_matches('/').split('/').collect();
        if components.iter().any(|c| c.is_empty()) {
            return err("has an empty path segment (`//`)".into());
        }
        let first_wild = components.iter().position(|c| c.contains(['*', '{', '}']));
        let Some(first_wild) = first_wild else {
            return err("has no wildcard; use `*` or `{name}` to match many databases".into());
        };
        let mut root = components[..first_wild].join("/");
        if absolute {
            root.insert(0, '/');
        }
        let mut names: Vec<String> = Vec::new();
        let mut plain = 0usize;
        let mut segments = Vec::new();
        for component in &components[first_wild..] {
            if matches!(*component, "." | "..") {
                return err(format!(
                    "segment `{component}` below a wildcard is not allowed"
                ));
            }
            match parse_segment(component, &mut names, &mut plain) {
                Ok(segment) => segments.push(segment),
                Err(msg) => return err(msg),
            }
        }
        // Plain `*` got placeholder names "*N"; name them now that we know how many there are.
        let named = names.iter().any(|n| !n.starts_with('*'));
        let mut counter = 0;
        for name in &mut names {
            if name.starts_with('*') {
                counter += 1;
                *name = if !named && plain == SEED_NAMES.len() {
                    SEED_NAMES[counter - 1].to_string()
                } else {
                    counter.to_string()
                };
            }
        }
        for (i, name) in names.iter().enumerate() {
            if names[..i].contains(name) {
                return err(format!("captures `{name}` twice"));
            }
        }
        Ok(Pattern {
            text: text.to_string(),
            root,
            segments,
            names,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The literal directory every match lives under (`""` means the current directory).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The segments below the root; the last one names files.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Capture names in order of appearance.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Splits `path` into the components below the root, or says why it cannot match.
    fn components<'a>(&self, path: &'a str) -> Result<Vec<&'a str>, String> {
        let rest = if self.root.is_empty() {
            Some(path.trim_start_matches("./"))
        } else {
            path.strip_prefix(self.root.as_str())
                .and_then(|r| r.strip_prefix('/'))
        };
        let Some(rest) = rest else {
            return Err(format!("is not under `{}`", self.root));
        };
        let components: Vec<&str> = rest.split('/').collect();
        if components.len() != self.segments.len() {
            return Err(format!(
                "has {} segment(s) below `{}`; the pattern needs {}",
                components.len(),
                self.display_root(),
                self.segments.len()
            ));
        }
        Ok(components)
    }

    fn display_root(&self) -> &str {
        if self.root.is_empty() {
            "."
        } else {
            &self.root
        }
    }

    /// The fields of `path`, or a sentence saying why it does not match.
    pub fn parse(&self, path: &str) -> Result<Fields, String> {
        let components = self.components(path)?;
        self.fields_of(&components)
    }

    /// The fields of a path already split into its components below the root.
    pub fn fields_of(&self, components: &[&str]) -> Result<Fields, String> {
        let mut captured = Vec::with_capacity(self.names.len());
        for (i, (segment, component)) in self.segments.iter().zip(components).enumerate() {
            if !segment.captures(component, &mut captured) {
                return Err(format!(
                    "has segment {} `{component}`, which does not match `{}`",
                    i + 1,
                    self.segment_text(i)
                ));
            }
        }
        let fields = captured
            .into_iter()
            .map(|(index, value)| (self.names[index].clone(), value.to_string()))
            .collect();
        Ok(Fields(fields))
    }

    /// The text of segment `i` as written in the pattern.
    pub fn segment_text(&self, i: usize) -> &str {
        let skip = self.text.trim_start_matches('/').split('/').count() - self.segments.len();
        self.text
            .trim_start_matches('/')
            .split('/')
            .nth(skip + i)
            .unwrap_or("")
    }
}

/// Parses one pattern component into literal and capture parts.
fn parse_segment(
    text: &str,
    names: &mut Vec<String>,
    plain: &mut usize,
) -> Result<Segment, String> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let capture = match c {
            '*' => {
                *plain += 1;
                format!("*{plain}")
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(c) => name.push(c),
                        None => return Err(format!("`{{{name}` in `{text}` is not closed")),
                    }
                }
                if !is_identifier(&name) {
                    return Err(format!(
                        "`{{{name}}}` in `{text}`: a capture name is letters, digits and `_`, not starting with a digit"
                    ));
                }
                name
            }
            '}' => return Err(format!("unmatched `}}` in `{text}`")),
            other => {
                literal.push(other);
                continue;
            }
        };
        if literal.is_empty() && matches!(parts.last(), Some(Part::Capture(_))) {
            return Err(format!(
                "two wildcards in a row in `{text}` are ambiguous; separate them with literal text"
            ));
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(std::mem::take(&mut literal)));
        }
        names.push(capture);
        parts.push(Part::Capture(names.len() - 1));
    }
    if !literal.is_empty() {
        parts.push(Part::Literal(literal));
    }
    Ok(Segment { parts })
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Why a template could not be parsed or expanded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TemplateError(String);

impl TemplateError {
    pub(crate) fn new(message: String) -> TemplateError {
        TemplateError(message)
    }
}

pub use crate::replica::location_fault;

/// A replica path template such as `/backups/{{project}}/{{tenant}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    text: String,
    parts: Vec<TemplatePart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TemplatePart {
    Literal(String),
    Field(String),
}

impl Template {
    /// Parses a template; `known` are the names the pattern captures.
    pub fn new(text: &str, known: &[String]) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                parts.push(TemplatePart::Literal(rest[..open].to_string()));
            }
            let after = &rest[open + 2..];
            let Some(close) = after.find("}}") else {
                return Err(TemplateError(format!(
                    "`{{{{` in `{text}` is not closed with `}}}}`"
                )));
            };
            let name = after[..close].trim();
            if name.contains("{{") {
                return Err(TemplateError(format!(
                    "unclosed `{{{{` in `{text}`: `{{{{{}` has no `}}}}` before the next `{{{{`",
                    &after[..after.find("{{").unwrap_or(0)]
                )));
            }
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(TemplateError(format!(
                    "`{{{{{name}}}}}` in `{text}` is not a name: a name is letters, digits and `_`"
                )));
            }
            if !known.iter().any(|k| k == name) {
                let known = if known.is_empty() {
                    "nothing".to_string()
                } else {
                    known.join(", ")
                };
                return Err(TemplateError(format!(
                    "unknown name `{{{{{name}}}}}`; the pattern captures {known}"
                )));
            }
            parts.push(TemplatePart::Field(name.to_string()));
            rest = &after[close + 2..];
        }
        if !rest.is_empty() {
            parts.push(TemplatePart::Literal(rest.to_string()));
        }
        let literal_text: String = parts
            .iter()
            .filter_map(|p| match p {
                TemplatePart::Literal(l) => Some(l.as_str()),
                TemplatePart::Field(_) => None,
            })
            .collect();
        if literal_text.split('/').any(|s| s == "..") || literal_text.contains(['\0', '{', '}']) {
            return Err(TemplateError(format!(
                "`{text}` contains `..`, NUL or a stray brace outside `{{{{name}}}}`"
            )));
        }
        Ok(Template {
            text: text.to_string(),
            parts,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Expands the template with `fields`, refusing values that are not a safe path segment.
    pub fn expand(&self, fields: &Fields) -> Result<String, TemplateError> {
        let mut out = String::with_capacity(self.text.len() + 32);
        for part in &self.parts {
            match part {
                TemplatePart::Literal(text) => out.push_str(text),
                TemplatePart::Field(name) => {
                    let value = fields
                        .get(name)
                        .ok_or_else(|| TemplateError(format!("no value for `{{{{{name}}}}}`")))?;
                    check_segment_value(name, value)?;
                    out.push_str(value);
                }
            }
        }
        Ok(out)
    }
}

/// A captured value becomes a path segment of a replica: it must not be able to leave it.
fn check_segment_value(name: &str, value: &str) -> Result<(), TemplateError> {
    let refuse = |why: &str| Err(TemplateError(format!("{name} value {value:?} {why}")));
    if value.is_empty() {
        return refuse("is empty");
    }
    if value == "." {
        return refuse("is `.`, which names the directory around it");
    }
    if value.contains('/') {
        return refuse("contains `/`");
    }
    if value.contains("..") {
        return refuse("contains `..`");
    }
    if value.chars().any(char::is_control) {
        return refuse("contains NUL or a control character");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SEED: &str = "/data/*/databases/*/branches/*/tenants/*.db";

    #[test]
    fn seed_pattern_names_four_wildcards() {
        let p = Pattern::new(SEED).unwrap();
        assert_eq!(p.root(), "/data");
        assert_eq!(p.names(), ["project", "database", "branch", "tenant"]);
        let f = p
            .parse("/data/project1/databases/userdb/branches/main/tenants/acme.db")
            .unwrap();
        assert_eq!(
            f.to_string(),
            "project=project1 database=userdb branch=main tenant=acme"
        );
    }

    #[test]
    fn named_and_numbered_captures() {
        let p = Pattern::new("/srv/{tenant}/db_{shard}.sqlite").unwrap();
        assert_eq!(p.names(), ["tenant", "shard"]);
        let f = p.parse("/srv/acme/db_7.sqlite").unwrap();
        assert_eq!(f.get("shard"), Some("7"));
        let p = Pattern::new("/srv/*/*.db").unwrap();
        assert_eq!(p.names(), ["1", "2"]);
        let p = Pattern::new("data/{org}/*.db").unwrap();
        assert_eq!(p.names(), ["org", "1"]);
        assert_eq!(p.parse("data/a/b.db").unwrap().to_string(), "org=a 1=b");
    }

    #[test]
    fn relative_pattern_without_root() {
        let p = Pattern::new("*.db").unwrap();
        assert_eq!(p.root(), "");
        assert_eq!(p.parse("x.db").unwrap().to_string(), "1=x");
        assert_eq!(p.parse("./x.db").unwrap().to_string(), "1=x");
    }

    #[test]
    fn parse_says_why_a_path_does_not_match() {
        let p = Pattern::new(SEED).unwrap();
        assert_eq!(p.parse("/other/x.db").unwrap_err(), "is not under `/data`");
        assert_eq!(
            p.parse("/data/p/databases/d.db").unwrap_err(),
            "has 3 segment(s) below `/data`; the pattern needs 7"
        );
        assert_eq!(
            p.parse("/data/p/dbs/d/branches/b/tenants/t.db")
                .unwrap_err(),
            "has segment 2 `dbs`, which does not match `databases`"
        );
        assert_eq!(
            p.parse("/data/p/databases/d/branches/b/tenants/t.sqlite")
                .unwrap_err(),
            "has segment 7 `t.sqlite`, which does not match `*.db`"
        );
        assert_eq!(
            p.parse("/data/p/databases/d/branches/b/tenants/.db")
                .unwrap_err(),
            "has segment 7 `.db`, which does not match `*.db`"
        );
    }

    #[test]
    fn unsupported_syntax_is_refused() {
        for (text, needle) in [
            ("/data/**/x.db", "recursive `**` is not supported"),
            ("/data/?.db", "glob syntax `?`"),
            ("/data/[ab].db", "glob syntax `[`"),
            ("/data/x.db", "has no wildcard"),
            ("/data/*/", "ends with `/`"),
            ("/data//*.db", "empty path segment"),
            ("/data/{a}{b}.db", "two wildcards in a row"),
            ("/data/{a.db", "is not closed"),
            ("/data/{1a}.db", "a capture name is letters"),
            ("/data/{a}/{a}.db", "captures `a` twice"),
            ("/data/*/../*.db", "segment `..` below a wildcard"),
            ("/data/a}.db", "unmatched `}`"),
        ] {
            let e = Pattern::new(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
            assert!(e.starts_with(&format!("pattern `{text}`: ")), "{e}");
        }
    }

    #[test]
    fn templates_expand_and_refuse_unsafe_values() {
        let p = Pattern::new(SEED).unwrap();
        let t = Template::new("{{project}}/{{database}}/{{branch}}/{{tenant}}", p.names()).unwrap();
        let f = p
            .parse("/data/p1/databases/db/branches/main/tenants/acme.db")
            .unwrap();
        assert_eq!(t.expand(&f).unwrap(), "p1/db/main/acme");
        let e = Template::new("{{project}}/{{shard}}", p.names()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown name `{{shard}}`; the pattern captures project, database, branch, tenant"
        );
        assert!(Template::new("/b/{{tenant", p.names()).is_err());
        assert!(Template::new("/b/../{{tenant}}", p.names()).is_err());
        let dots = p
            .parse("/data/p1/databases/db/branches/main/tenants/...db")
            .unwrap();
        assert_eq!(dots.get("tenant"), Some(".."));
        assert_eq!(
            t.expand(&dots).unwrap_err().to_string(),
            "tenant value \"..\" contains `..`"
        );
        let dot = p
            .parse("/data/p1/databases/db/branches/main/tenants/..db")
            .unwrap();
        assert_eq!(
            t.expand(&dot).unwrap_err().to_string(),
            "tenant value \".\" is `.`, which names the directory around it"
        );
        let ctl = p
            .parse("/data/p1/databases/db/branches/ma\u{1}in/tenants/a.db")
            .unwrap();
        assert!(t
            .expand(&ctl)
            .unwrap_err()
            .to_string()
            .contains("control character"));
    }

    #[test]
    fn regression_10_unclosed_braces_are_syntax_errors() {
        let names = ["project".to_string(), "tenant".to_string()];
        assert_eq!(
            Template::new("{{project/{{tenant}}", &names)
                .unwrap_err()
                .to_string(),
            "unclosed `{{` in `{{project/{{tenant}}`: `{{project/` has no `}}` before the next `{{`"
        );
        assert_eq!(
            Template::new("/r/{{pro ject}}", &names)
                .unwrap_err()
                .to_string(),
            "`{{pro ject}}` in `/r/{{pro ject}}` is not a name: a name is letters, digits and `_`"
        );
    }

    #[test]
    fn regression_10_locations_must_be_canonical() {
        for ok in ["/r/a/b", "a/b.c/..d", "/r/.x/x."] {
            assert_eq!(location_fault(ok), None, "{ok}");
        }
        for (bad, why) in [
            ("/r/../b", "`..`"),
            ("/r/./b", "`.`"),
            ("/r//b", "empty"),
            ("/r/b/", "empty"),
            ("a/./b", "`.`"),
            ("..", "`..`"),
            ("", "empty"),
        ] {
            let fault = location_fault(bad).unwrap_or_default();
            assert!(fault.contains(why), "{bad}: {fault}");
        }
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_][a-zA-Z0-9_.-]{0,12}".prop_filter("no ..", |s| !s.contains(".."))
    }

    proptest! {
        #[test]
        fn parse_recovers_what_was_put_in(a in name(), b in name(), c in name(), d in name()) {
            let p = Pattern::new(SEED).unwrap();
            let path = format!("/data/{a}/databases/{b}/branches/{c}/tenants/{d}.db");
            let f = p.parse(&path).unwrap();
            prop_assert_eq!(f.get("project"), Some(a.as_str()));
            prop_assert_eq!(f.get("database"), Some(b.as_str()));
            prop_assert_eq!(f.get("branch"), Some(c.as_str()));
            prop_assert_eq!(f.get("tenant"), Some(d.as_str()));
            let t = Template::new("/r/{{project}}/{{database}}/{{branch}}/{{tenant}}", p.names()).unwrap();
            prop_assert_eq!(t.expand(&f).unwrap(), format!("/r/{a}/{b}/{c}/{d}"));
        }

        #[test]
        fn matcher_agrees_with_a_regex_model(x in "[a-z_]{1,6}", y in "[a-z_]{1,6}", s in "[a-z_]{0,14}") {
            // `db_{x}_{y}.s`: a match must exist exactly when the text has the shape, and the
            // captures must reassemble the text.
            let p = Pattern::new("/r/db_{x}_{y}.s").unwrap();
            let text = format!("db_{x}_{y}.s");
            let f = p.parse(&format!("/r/{text}")).unwrap();
            prop_assert_eq!(format!("db_{}_{}.s", f.get("x").unwrap(), f.get("y").unwrap()), text);
            let other = format!("/r/{s}");
            let expect = s.strip_prefix("db_").and_then(|r| r.strip_suffix(".s"))
                .is_some_and(|mid| mid.char_indices().any(|(i, c)| c == '_' && i > 0 && i + 1 < mid.len()));
            prop_assert_eq!(p.parse(&other).is_ok(), expect);
        }
    }
}
