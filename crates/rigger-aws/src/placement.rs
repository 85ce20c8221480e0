//! Where each stand-alone server of the environment is ([`placements`]): its recipe id and
//! private address, as found on what exists (after a failover a replica serves as
//! `db-primary` and keeps its own id and address), else as configured.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::environment::{AwsEnvironment, Network, Placement};
use crate::live::Live;
use crate::tags::SERVER_TAG;

pub(crate) fn short_name(env: &AwsEnvironment, name: &str) -> String {
    name.strip_prefix(&format!("{}-{}-", env.project(), env.name))
        .unwrap_or(name)
        .to_owned()
}

/// Where each stand-alone server of the configuration is, when that is not where the
/// configuration puts it (see the module's documentation). A server that exists keeps the
/// recipe id and address it has (its instance's, else its network interface's: an
/// interrupted creation); a missing one gets the configured ones unless another server
/// already holds them, and then the next free id (`db-replica2`) and the next free address
/// below the stand-alone block of its subnet.
pub fn placements(
    env: &AwsEnvironment,
    network: &Network,
    live: &Live,
) -> BTreeMap<String, Placement> {
    let configured = env
        .with_placements(BTreeMap::new())
        .stand_alone_servers(network);
    // Ids and addresses held by anything of the environment, fenced servers included.
    let mut ids: BTreeSet<String> = BTreeSet::new();
    let mut addresses: BTreeSet<Ipv4Addr> = BTreeSet::new();
    for instance in live.instances.values() {
        if instance.tags.contains_key("aws:autoscaling:groupName") {
            continue;
        }
        if let Some(id) = instance.tags.get(SERVER_TAG) {
            ids.insert(id.clone());
        } else if let Some(name) = instance.tags.get("Name") {
            ids.insert(short_name(env, name));
        }
        addresses.extend(
            instance
                .private_address
                .as_deref()
                .and_then(|a| a.parse::<Ipv4Addr>().ok()),
        );
    }
    for interface in &live.interfaces {
        ids.extend(interface.tags.get(SERVER_TAG).cloned());
        addresses.extend(
            interface
                .private_address
                .as_deref()
                .and_then(|a| a.parse::<Ipv4Addr>().ok()),
        );
    }
    let mut placements = BTreeMap::new();
    let mut missing = Vec::new();
    for server in &configured {
        let existing = live
            .server(&server.name)
            .map(|i| (i.tags.get(SERVER_TAG), i.private_address.as_deref()))
            .or_else(|| {
                live.interface(&server.name)
                    .map(|i| (i.tags.get(SERVER_TAG), i.private_address.as_deref()))
            });
        match existing {
            Some((id, address)) => {
                let placed = Placement {
                    id: id.cloned().unwrap_or_else(|| server.id.clone()),
                    address: address
                        .and_then(|a| a.parse().ok())
                        .unwrap_or(server.address),
                };
                if placed.id != server.id || placed.address != server.address {
                    placements.insert(server.name.clone(), placed);
                }
            }
            None => missing.push(server),
        }
    }
    for server in missing {
        let mut id = server.id.clone();
        if ids.contains(&id) {
            let base = id.trim_end_matches(|c: char| c.is_ascii_digit()).to_owned();
            id = (1..)
                .map(|n| format!("{base}{n}"))
                .find(|candidate| !ids.contains(candidate))
                .expect("an unused number");
        }
        let mut address = server.address;
        if addresses.contains(&address) {
            let top = network
                .subnets
                .get(server.subnet)
                .map_or(0, |s| crate::environment::last_usable(s.cidr));
            // Below the block the configuration's servers take (10 below the top, down).
            address = (configured.len() as u32..)
                .map(|n| Ipv4Addr::from(top - 10 - n))
                .find(|candidate| !addresses.contains(candidate))
                .expect("a free address");
        }
        ids.insert(id.clone());
        addresses.insert(address);
        if id != server.id || address != server.address {
            placements.insert(server.name.clone(), Placement { id, address });
        }
    }
    placements
}
