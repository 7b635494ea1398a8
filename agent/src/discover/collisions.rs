//! One database per replica location: finds discovered databases whose expanded template
//! names the same place (hazard 11 in DESIGN.md).
//!
//! A template that leaves out a captured field (`{{database}}/{{branch}}/{{tenant}}` over a
//! pattern that also captures `project`), or joins fields ambiguously (`{{a}}-{{b}}`), maps two
//! databases to one location; both would append to one chain, and a restore of either would
//! "verify" and hold the other's rows. Both are refused, by the agent and in
//! `multidb databases`. The check keeps one 64-bit hash per database for the length of the
//! call (not a string), and compares the full locations only when two hashes meet.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use crate::config::ReplicaTemplate;
use crate::discover::arena::{Arena, DbId};
use crate::discover::pattern::Pattern;
use crate::replica::ReplicaUrl;

/// The place a replica URL names, as one comparable string: the directory of a file replica,
/// or the bucket and key prefix of an S3 replica (endpoint and region do not separate two
/// prefixes of one bucket).
pub fn location_key(url: &ReplicaUrl) -> String {
    match url {
        ReplicaUrl::File(path) => format!("file:{}", path.display()),
        ReplicaUrl::S3(s3) => format!("s3:{}/{}", s3.bucket, s3.prefix),
    }
}

/// The location of database `id`, if its template expands.
pub fn location_of(
    arena: &Arena,
    pattern: &Pattern,
    template: &ReplicaTemplate,
    id: DbId,
) -> Option<String> {
    let fields = pattern.fields_of(&arena.components(id)).ok()?;
    template.url_for(&fields).ok().map(|u| location_key(&u))
}

/// Every database that shares its location with another, mapped to one of the others.
pub fn find(arena: &Arena, pattern: &Pattern, template: &ReplicaTemplate) -> HashMap<DbId, DbId> {
    let mut first_by_hash: HashMap<u64, DbId> = HashMap::with_capacity(arena.len());
    let mut shared: HashMap<DbId, DbId> = HashMap::new();
    for id in arena.ids() {
        let Some(location) = location_of(arena, pattern, template, id) else {
            continue;
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        location.hash(&mut hasher);
        let hash = hasher.finish();
        match first_by_hash.get(&hash) {
            None => {
                first_by_hash.insert(hash, id);
            }
            Some(&first) => {
                // Equal hashes almost always mean equal locations; make sure.
                if location_of(arena, pattern, template, first).as_deref()
                    == Some(location.as_str())
                {
                    shared.insert(id, first);
                    shared.entry(first).or_insert(id);
                }
            }
        }
    }
    shared
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(paths: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for p in paths {
            let path = dir.path().join(p);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"").unwrap();
        }
        dir
    }

    #[test]
    fn a_template_without_a_captured_field_maps_two_databases_to_one_place() {
        let dir = site(&[
            "pa/d/main/acme.db",
            "pb/d/main/acme.db",
            "pa/d/main/other.db",
        ]);
        let root = dir.path().display();
        let yaml = format!(
            "multi_db:\n  discovery_pattern: \"{root}/*/*/*/*.db\"\n  replica_template:\n    type: file\n    path: \"/r/{{{{database}}}}/{{{{branch}}}}/{{{{tenant}}}}\"\n"
        );
        let config = crate::config::Config::parse(&yaml, "test.yml", None).unwrap();
        let pattern = &config.multi_db.pattern;
        let template = config.multi_db.replica.as_ref().unwrap();
        let (arena, _) = crate::discover::discover(&config).unwrap();
        let shared = find(&arena, pattern, template);
        let path = |id: &DbId| arena.path(*id);
        let mut names: Vec<(String, String)> =
            shared.iter().map(|(a, b)| (path(a), path(b))).collect();
        names.sort();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].0.ends_with("pa/d/main/acme.db"));
        assert!(names[0].1.ends_with("pb/d/main/acme.db"));
        assert!(names[1].0.ends_with("pb/d/main/acme.db"));

        let full = yaml.replace("/r/{{database}}", "/r/{{project}}/{{database}}");
        let config = crate::config::Config::parse(&full, "test.yml", None).unwrap();
        let template = config.multi_db.replica.as_ref().unwrap();
        assert!(find(&arena, &config.multi_db.pattern, template).is_empty());
    }
}
