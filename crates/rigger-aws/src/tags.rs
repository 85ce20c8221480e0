//! How rigger marks and finds what it owns on AWS, below every other module: the tags it
//! reads back (a stand-alone server's recipe id, a fenced old primary) and the EC2 filters it
//! searches with.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::Filter;

/// A resource's tags, by key.
pub type Tags = BTreeMap<String, String>;

pub(crate) fn filter<'a>(name: &str, values: impl IntoIterator<Item = &'a str>) -> Filter {
    let mut builder = Filter::builder().name(name);
    for value in values {
        builder = builder.values(value);
    }
    builder.build()
}

/// The tag holding a stand-alone server's recipe id (on its instance and network interface).
pub const SERVER_TAG: &str = "server";

/// The tag a fenced old primary (and its volume and interface) carries: Unix seconds of the
/// failover.
pub const FENCED_TAG: &str = "fenced";

/// Whether a resource carries [`FENCED_TAG`].
pub fn is_fenced(tags: &Tags) -> bool {
    tags.contains_key(FENCED_TAG)
}
