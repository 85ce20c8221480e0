//! The supervisor's record of the environment's servers: ids, roles, addresses, and which
//! release each runs. Written atomically after every change, so a restarted supervisor (or a
//! `rigger status` in another process) sees the same servers.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;

use rigger_config::Cidr;
use rigger_recipes::Role;
use serde::{Deserialize, Serialize};

/// The third octet of each role's addresses inside the environment's `/16`.
pub mod subnet {
    pub const LOAD_BALANCER: u8 = 0;
    pub const WEB: u8 = 1;
    pub const WORKER: u8 = 2;
    pub const CACHE: u8 = 3;
    pub const DATABASE: u8 = 4;
}

/// Where a server is in its life, as an Auto Scaling group would say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerState {
    /// Being set up; not yet behind the load balancer.
    Pending,
    InService,
    /// A process died; it is being stopped and replaced.
    Unhealthy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRecord {
    /// `web-3`, `worker-1`, `cache`, `db-primary`, `db-replica1`: group servers get a new
    /// number each time, so a replacement never reuses an id (nor an address).
    pub id: String,
    pub roles: Vec<String>,
    pub address: Ipv4Addr,
    pub release: String,
    pub state: ServerState,
    /// Runs Celery beat (exactly one worker of the environment does).
    #[serde(default)]
    pub beat: bool,
}

impl ServerRecord {
    pub fn roles(&self) -> Vec<Role> {
        self.roles
            .iter()
            .filter_map(|name| role_from_str(name))
            .collect()
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles.iter().any(|name| name == role.as_str())
    }

    /// The group this server belongs to (`web` or `worker`), if any.
    pub fn group(&self) -> Option<Role> {
        [Role::Web, Role::Worker]
            .into_iter()
            .find(|role| self.has_role(*role))
    }
}

pub fn role_from_str(name: &str) -> Option<Role> {
    Role::ALL.into_iter().find(|role| role.as_str() == name)
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub servers: Vec<ServerRecord>,
    /// The last number given to a server of each group.
    pub last_number: BTreeMap<String, u32>,
    /// Releases whose migrations have run (migrations run once per release).
    #[serde(default)]
    pub migrated: Vec<String>,
    /// The release new servers run: the last one deployed successfully.
    #[serde(default)]
    pub current_release: Option<String>,
    /// Register web servers with the load balancer while they are still starting (true only
    /// during a first bring-up, when no traffic flows yet).
    #[serde(skip)]
    pub register_pending: bool,
}

impl Registry {
    /// The registry at `path`; empty when there is none yet. A file that cannot be read or
    /// parsed is an error naming it, never an empty registry: that would lose the servers'
    /// numbers and the migrated releases.
    pub fn load(path: &Path) -> std::io::Result<Registry> {
        read_state(
            path,
            "rigger's record of the environment's servers and releases; stop the environment \
             (`rigger down`), move the file aside and `rigger up` again (the current release's \
             migrations run once more)",
        )
        .map(Option::unwrap_or_default)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_atomically(
            path,
            &serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?,
        )
    }

    pub fn get(&self, id: &str) -> Option<&ServerRecord> {
        self.servers.iter().find(|server| server.id == id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut ServerRecord> {
        self.servers.iter_mut().find(|server| server.id == id)
    }

    pub fn group_members(&self, role: Role) -> impl Iterator<Item = &ServerRecord> {
        self.servers
            .iter()
            .filter(move |server| server.group() == Some(role))
    }

    /// A new server for group `role`: the next number, and an address derived from it so
    /// that a replacement gets a different one ([`Registry::address_for`]).
    pub fn new_group_server(&mut self, role: Role, block: Cidr, release: &str) -> ServerRecord {
        let number = self.next_number(role.as_str());
        let subnet = if role == Role::Web {
            subnet::WEB
        } else {
            subnet::WORKER
        };
        ServerRecord {
            id: format!("{}-{number}", role.as_str()),
            roles: vec![role.as_str().to_owned()],
            address: self.address_for(block, subnet, 1, number),
            release: release.to_owned(),
            state: ServerState::Pending,
            beat: false,
        }
    }

    /// The next number of the servers of `kind` (`web`, `db-replica`), counted over the
    /// environment's lifetime.
    pub fn next_number(&mut self, kind: &str) -> u32 {
        let number = self.last_number.entry(kind.to_owned()).or_insert(0);
        *number += 1;
        *number
    }

    /// The address of the `number`th server of a kind in `subnet`: host `first + (number - 1)
    /// % 250`, so numbers cycle through 250 hosts from `first`; a host a server of the
    /// registry still holds is skipped, so a long-lived server's address is never given
    /// twice. rigger.toml's limits keep far fewer than 250 servers of a kind alive at once
    /// (`rigger_config::GroupSizing::MAX_LOCAL_SERVERS`); were all 250 held, the cycled host
    /// is returned.
    pub fn address_for(&self, block: Cidr, subnet: u8, first: u8, number: u32) -> Ipv4Addr {
        const HOSTS: u32 = 250;
        let host = |offset: u32| {
            let index = (number.saturating_sub(1) + offset) % HOSTS;
            address(
                block,
                subnet,
                u8::try_from(u32::from(first) + index).unwrap_or(u8::MAX),
            )
        };
        (0..HOSTS)
            .map(host)
            .find(|candidate| self.servers.iter().all(|s| s.address != *candidate))
            .unwrap_or_else(|| host(0))
    }

    pub fn remove(&mut self, id: &str) {
        self.servers.retain(|server| server.id != id);
    }
}

/// The state file at `path` (`registry.json`, `desired.json`) as `T`; `None` when it does not
/// exist. An unreadable or unparseable file is an error that names it, says what it is
/// (`what_to_do` starts with that) and what to do: rigger wrote it, so a damaged one means
/// something went wrong that silently starting afresh would hide.
pub(crate) fn read_state<T: serde::de::DeserializeOwned>(
    path: &Path,
    what_to_do: &str,
) -> std::io::Result<Option<T>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(std::io::Error::new(
                error.kind(),
                format!("cannot read {}: {error}", path.display()),
            ));
        }
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|error| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} is damaged ({error}); it is {what_to_do}",
                path.display()
            ),
        )
    })
}

/// The address `127.<block>.<subnet>.<host>`.
pub fn address(block: Cidr, subnet: u8, host: u8) -> Ipv4Addr {
    let [a, b, _, _] = block.addr.octets();
    Ipv4Addr::new(a, b, subnet, host)
}

pub use crate::files::write_atomically;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replacements_get_new_ids_and_addresses() {
        let block: Cidr = "127.77.0.0/16".parse().unwrap();
        let mut registry = Registry::default();
        let first = registry.new_group_server(Role::Web, block, "r1");
        let second = registry.new_group_server(Role::Web, block, "r1");
        let worker = registry.new_group_server(Role::Worker, block, "r1");
        assert_eq!(
            (first.id.as_str(), first.address),
            ("web-1", Ipv4Addr::new(127, 77, 1, 1))
        );
        assert_eq!(
            (second.id.as_str(), second.address),
            ("web-2", Ipv4Addr::new(127, 77, 1, 2))
        );
        assert_eq!(
            (worker.id.as_str(), worker.address),
            ("worker-1", Ipv4Addr::new(127, 77, 2, 1))
        );
    }

    /// web-1 lives on while 250 other web servers come and go: web-251's number cycles back
    /// to web-1's host, which is skipped (it was given web-1's address before).
    #[test]
    fn a_live_servers_address_is_never_given_again() {
        let block: Cidr = "127.77.0.0/16".parse().unwrap();
        let mut registry = Registry::default();
        let first = registry.new_group_server(Role::Web, block, "r1");
        registry.servers.push(first.clone());
        for _ in 2..=250 {
            let passing = registry.new_group_server(Role::Web, block, "r1");
            assert_ne!(passing.address, first.address);
        }
        let wrapped = registry.new_group_server(Role::Web, block, "r1");
        assert_eq!(wrapped.id, "web-251");
        assert_eq!(wrapped.address, Ipv4Addr::new(127, 77, 1, 2));
    }

    #[test]
    fn a_damaged_registry_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        assert_eq!(Registry::load(&path).unwrap(), Registry::default());
        std::fs::write(&path, "{\"servers\": [").unwrap();
        let error = Registry::load(&path).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("{} is damaged (", path.display())),
            "{error}"
        );
        assert!(error.contains("move the file aside"), "{error}");
        std::fs::write(&path, "").unwrap();
        assert!(Registry::load(&path).is_err());
    }
}
