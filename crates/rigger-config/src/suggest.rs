//! "Did you mean" suggestions for misspelled keys and values.
//!
//! [`closest`] picks the candidate with the smallest [`edit_distance`], and only if it is close
//! enough that the suggestion is more likely right than noise.

/// Number of single-character insertions, deletions, substitutions and transpositions of
/// adjacent characters that turn `a` into `b` (optimal string alignment distance).
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    // Three rows are enough: a transposition looks back two rows.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut current = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        current[0] = i;
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (previous[j] + 1)
                .min(current[j - 1] + 1)
                .min(previous[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(before[j - 2] + 1);
            }
            current[j] = d;
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut current);
    }
    previous[b.len()]
}

/// The candidate closest to `word`, if it is within a third of the word's length (at least
/// one edit). Ties go to the earlier candidate. Comparison ignores ASCII case.
pub(crate) fn closest<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    let word = word.to_ascii_lowercase();
    let limit = (word.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&word, c), c))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distances() {
        assert_eq!(edit_distance("", ""), 0);
        assert_eq!(edit_distance("abc", ""), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("desired", "desired"), 0);
        assert_eq!(edit_distance("desird", "desired"), 1);
        assert_eq!(edit_distance("reigon", "region"), 1, "transposition");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("wsgi", "celery_app"), 10);
        assert_eq!(edit_distance("é", "e"), 1, "counts characters");
    }

    #[test]
    fn suggests_only_close_candidates() {
        let keys = ["min", "max", "desired", "instance_type", "volume_size"];
        assert_eq!(closest("desird", keys), Some("desired"));
        assert_eq!(closest("instance-type", keys), Some("instance_type"));
        assert_eq!(closest("volume", keys), None);
        assert_eq!(closest("count", keys), None);
        assert_eq!(closest("mx", keys), Some("max"));
        assert_eq!(closest("AWS", ["local", "aws"]), Some("aws"));
        assert_eq!(closest("docker", ["local", "aws"]), None);
    }
}
