//! Templates read backwards: from a replica location to the database whose history it holds.
//!
//! `restore --all` and `replicas` find replicas by walking the replica root, and each location
//! found must name exactly one database path. That holds when the template uses every field
//! the pattern captures (a field left out could be anything) and no two fields touch (in
//! `{{a}}{{b}}`, `xyz` splits three ways). Templates that break either rule are refused as a
//! whole, naming the template. Within one component, fields separated by literal text are
//! split as the pattern splits paths (each field as short as the rest allows); a location whose
//! values contain the separator could still split otherwise, so every inversion is confirmed by
//! the forward direction: the path found must parse and expand back to the very location.

use super::{Fields, Part, Pattern, Segment, Template, TemplateError, TemplatePart};

/// A template that can be read backwards, for one pattern.
#[derive(Debug, Clone)]
pub struct Inverse {
    pattern: Pattern,
    template: Template,
    /// Names of the template's fields, indexed by the segments' captures.
    names: Vec<String>,
    /// One per `/`-separated component of the template; a leading `/` gives an empty first one.
    segments: Vec<Segment>,
    /// How many leading components hold no field: the fixed root every location lives under.
    fixed: usize,
}

impl Template {
    /// The inverse of this template for `pattern`, or why a location could not name one
    /// database path.
    pub fn inverse(&self, pattern: &Pattern) -> Result<Inverse, TemplateError> {
        let refuse = |why: String| {
            Err(TemplateError(format!(
                "template `{}` cannot be read back into database paths: {why}",
                self.text
            )))
        };
        let missing: Vec<&str> = pattern
            .names()
            .iter()
            .filter(|name| {
                !self
                    .parts
                    .iter()
                    .any(|p| matches!(p, TemplatePart::Field(f) if f == *name))
            })
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            let list: Vec<String> = missing.iter().map(|n| format!("`{{{{{n}}}}}`")).collect();
            return refuse(format!(
                "it leaves out {} of the pattern `{}`, so a location does not say which database it holds",
                list.join(", "),
                pattern.as_str()
            ));
        }
        let mut names: Vec<String> = Vec::new();
        let mut segments = vec![Segment { parts: Vec::new() }];
        let mut previous_field: Option<&str> = None;
        for part in &self.parts {
            match part {
                TemplatePart::Literal(text) => {
                    previous_field = None;
                    let mut pieces = text.split('/');
                    if let Some(first) = pieces.next() {
                        push_literal(segments.last_mut(), first);
                    }
                    for piece in pieces {
                        segments.push(Segment { parts: Vec::new() });
                        push_literal(segments.last_mut(), piece);
                    }
                }
                TemplatePart::Field(name) => {
                    if let Some(before) = previous_field {
                        return refuse(format!(
                            "`{{{{{before}}}}}` and `{{{{{name}}}}}` touch with nothing between them, so their values cannot be told apart"
                        ));
                    }
                    previous_field = Some(name);
                    let index = names.iter().position(|n| n == name).unwrap_or_else(|| {
                        names.push(name.clone());
                        names.len() - 1
                    });
                    if let Some(segment) = segments.last_mut() {
                        segment.parts.push(Part::Capture(index));
                    }
                }
            }
        }
        let fixed = segments
            .iter()
            .take_while(|s| s.parts.iter().all(|p| matches!(p, Part::Literal(_))))
            .count();
        Ok(Inverse {
            pattern: pattern.clone(),
            template: self.clone(),
            names,
            segments,
            fixed,
        })
    }
}

fn push_literal(segment: Option<&mut Segment>, text: &str) {
    if let (Some(segment), false) = (segment, text.is_empty()) {
        segment.parts.push(Part::Literal(text.to_string()));
    }
}

impl Inverse {
    /// The template as written.
    pub fn template(&self) -> &str {
        self.template.as_str()
    }

    /// The literal root every location lives under: `/backups` for
    /// `/backups/{{project}}/{{tenant}}`, `""` for `{{project}}/{{tenant}}`.
    pub fn root(&self) -> String {
        let mut root = String::new();
        for (i, segment) in self.segments[..self.fixed].iter().enumerate() {
            if i > 0 {
                root.push('/');
            }
            if let Some(Part::Literal(text)) = segment.parts.first() {
                root.push_str(text);
            }
        }
        root
    }

    /// Components of a location below [`Inverse::root`].
    pub fn depth(&self) -> usize {
        self.segments.len() - self.fixed
    }

    /// Whether `name` can be component `level` (0-based, below the root) of a location.
    pub fn matches(&self, level: usize, name: &str) -> bool {
        self.segments
            .get(self.fixed + level)
            .is_some_and(|s| s.matches(name))
    }

    /// The database whose replica is at `location` (the template's full expansion, as
    /// [`Template::expand`] writes it), with its fields; or why the location names none.
    pub fn database(&self, location: &str) -> Result<(String, Fields), String> {
        let components: Vec<&str> = location.split('/').collect();
        if components.len() != self.segments.len() {
            return Err(format!(
                "`{location}` has {} component(s); the template `{}` has {}",
                components.len(),
                self.template.as_str(),
                self.segments.len()
            ));
        }
        let mut captured = Vec::new();
        for (segment, component) in self.segments.iter().zip(&components) {
            if !segment.captures(component, &mut captured) {
                return Err(format!(
                    "`{location}` does not match the template `{}` at `{component}`",
                    self.template.as_str()
                ));
            }
        }
        let mut values: Vec<Option<&str>> = vec![None; self.names.len()];
        for (index, value) in captured {
            match values[index] {
                Some(seen) if seen != value => {
                    return Err(format!(
                        "`{location}` gives `{{{{{}}}}}` two values, `{seen}` and `{value}`",
                        self.names[index]
                    ))
                }
                _ => values[index] = Some(value),
            }
        }
        let fields = Fields(
            self.pattern
                .names()
                .iter()
                .map(|name| {
                    let index = self.names.iter().position(|n| n == name);
                    let value = index.and_then(|i| values[i]).unwrap_or_default();
                    (name.clone(), value.to_string())
                })
                .collect(),
        );
        let path = self.pattern.path_for(&fields);
        // The forward direction decides: the path must parse into fields that expand back to
        // this very location, or the location belongs to another path (or to none).
        let forward = self
            .pattern
            .parse(&path)
            .map_err(|why| format!("`{location}` maps to {path}, which {why}"))?;
        match self.template.expand(&forward) {
            Ok(back) if back == location => Ok((path, forward)),
            Ok(back) => Err(format!(
                "`{location}` is ambiguous under the template `{}`: it reads as {path}, whose replica is `{back}`",
                self.template.as_str()
            )),
            Err(e) => Err(format!("`{location}` maps to {path}, which has no replica: {e}")),
        }
    }
}

impl Pattern {
    /// The path whose fields are `fields`: the pattern with each wildcard replaced by its value
    /// (an absent field by nothing, which no path of the pattern matches).
    pub fn path_for(&self, fields: &Fields) -> String {
        let mut path = self.root.clone();
        for segment in &self.segments {
            if !path.is_empty() {
                path.push('/');
            }
            for part in &segment.parts {
                match part {
                    Part::Literal(text) => path.push_str(text),
                    Part::Capture(index) => {
                        path.push_str(fields.get(&self.names[*index]).unwrap_or_default())
                    }
                }
            }
        }
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = "/data/*/databases/*/branches/*/tenants/*.db";

    fn inverse(pattern: &str, template: &str) -> Result<Inverse, String> {
        let p = Pattern::new(pattern).unwrap();
        let t = Template::new(template, p.names()).unwrap();
        t.inverse(&p).map_err(|e| e.to_string())
    }

    #[test]
    fn seed_locations_map_back_to_their_paths() {
        let inv = inverse(SEED, "/r/{{project}}/{{database}}/{{branch}}/{{tenant}}").unwrap();
        assert_eq!(inv.root(), "/r");
        assert_eq!(inv.depth(), 4);
        assert!(inv.matches(3, "acme"));
        let (path, fields) = inv.database("/r/p1/userdb/main/acme").unwrap();
        assert_eq!(
            path,
            "/data/p1/databases/userdb/branches/main/tenants/acme.db"
        );
        assert_eq!(fields.get("tenant"), Some("acme"));
        assert!(inv.database("/r/p1/userdb/main").is_err());

        let s3 = inverse(
            SEED,
            "backups/{{project}}/x-{{tenant}}/{{database}}_{{branch}}",
        )
        .unwrap();
        assert_eq!(s3.root(), "backups");
        assert_eq!(s3.depth(), 3);
        assert!(!s3.matches(1, "acme"));
        let (path, _) = s3.database("backups/p/x-acme/userdb_main").unwrap();
        assert_eq!(
            path,
            "/data/p/databases/userdb/branches/main/tenants/acme.db"
        );
        let bare = inverse("/d/{t}.db", "{{t}}").unwrap();
        assert_eq!((bare.root(), bare.depth()), (String::new(), 1));
        assert_eq!(bare.database("a").unwrap().0, "/d/a.db");
    }

    #[test]
    fn templates_that_lose_information_are_refused_by_name() {
        let e = inverse(SEED, "/r/{{database}}/{{branch}}/{{tenant}}").unwrap_err();
        assert!(
            e.starts_with("template `/r/{{database}}/{{branch}}/{{tenant}}` cannot be read back"),
            "{e}"
        );
        assert!(e.contains("leaves out `{{project}}`"), "{e}");
        let e = inverse(SEED, "/r/{{project}}{{database}}/{{branch}}/{{tenant}}").unwrap_err();
        assert!(e.contains("`{{project}}` and `{{database}}` touch"), "{e}");
    }

    #[test]
    fn ambiguous_and_inconsistent_locations_are_failures_not_guesses() {
        let inv = inverse("/d/{a}-{b}.db", "/r/{{a}}/{{b}}").unwrap();
        // `/d/x-y-z.db` parses as a=x, b=y-z, so its replica is /r/x/y-z, never /r/x-y/z.
        assert_eq!(inv.database("/r/x/y-z").unwrap().0, "/d/x-y-z.db");
        let e = inv.database("/r/x-y/z").unwrap_err();
        assert!(e.contains("ambiguous"), "{e}");
        let twice = inverse("/d/{a}.db", "/r/{{a}}/copy-{{a}}").unwrap();
        assert_eq!(twice.database("/r/q/copy-q").unwrap().0, "/d/q.db");
        assert!(twice
            .database("/r/q/copy-z")
            .unwrap_err()
            .contains("two values"));
    }

    #[test]
    fn locations_that_would_leave_the_data_root_name_no_database() {
        // S3 keys may hold `..`, `.` or empty components; a directory walk never yields them,
        // a hostile bucket can. None may map to a path outside the pattern's root.
        let inv = inverse(SEED, "/r/{{project}}/{{database}}/{{branch}}/{{tenant}}").unwrap();
        assert_eq!(
            inv.database("/r/p1/userdb/main/acme").unwrap().0,
            "/data/p1/databases/userdb/branches/main/tenants/acme.db"
        );
        for location in [
            "/r/../userdb/main/acme",
            "/r/p1/../main/acme",
            "/r/p1/userdb/./acme",
            "/r/p1/userdb/main/..",
            "/r/p1//main/acme",
        ] {
            let e = inv.database(location).unwrap_err();
            assert!(!e.is_empty(), "{location}");
        }
    }
}
