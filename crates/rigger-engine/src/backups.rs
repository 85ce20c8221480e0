//! Logical backups (`rigger db backup`, a custom-format `pg_dump`): their names and how many
//! are kept, one rule for every provider (local: a directory of the environment's state; AWS:
//! the `backups/` prefix of its bucket).

/// `<database>-<UTC timestamp>.dump`: names sort by time.
pub fn backup_name(database: &str, unix_seconds: u64) -> String {
    format!(
        "{database}-{}.dump",
        rigger_plan::deploys::utc_timestamp(unix_seconds)
    )
}

/// Whether `name` (a file or object name, without its directory) is a backup: a `.dump` that
/// is not hidden (a backup being written is `.<name>.partial`) and not in a subdirectory.
pub fn is_backup_name(name: &str) -> bool {
    name.ends_with(".dump") && !name.starts_with('.') && !name.contains('/')
}

/// The backups to delete so that only the newest `keep` remain (at least one is always
/// kept), oldest first.
pub fn to_prune(names: &[String], keep: usize) -> Vec<String> {
    let mut sorted: Vec<&String> = names.iter().filter(|n| is_backup_name(n)).collect();
    sorted.sort();
    let excess = sorted.len().saturating_sub(keep.max(1));
    sorted.into_iter().take(excess).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_by_time() {
        assert_eq!(backup_name("shop", 0), "shop-19700101T000000Z.dump");
        assert_eq!(
            backup_name("shop", 1_767_225_599),
            "shop-20251231T235959Z.dump"
        );
        assert!(is_backup_name("shop-19700101T000000Z.dump"));
        assert!(!is_backup_name(".shop-19700101T000000Z.dump.partial"));
        assert!(!is_backup_name("old/shop-19700101T000000Z.dump"));
    }

    #[test]
    fn the_newest_are_kept_and_always_one() {
        let names: Vec<String> = [3, 1, 2]
            .iter()
            .map(|day| backup_name("shop", day * 86_400))
            .chain(["notes.txt".to_owned()])
            .collect();
        assert_eq!(
            to_prune(&names, 2),
            [backup_name("shop", 86_400)],
            "the oldest goes"
        );
        assert_eq!(to_prune(&names, 0).len(), 2, "keep 0 keeps one");
        assert!(to_prune(&names, 5).is_empty());
    }
}
