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
    pub fn load(path: &Path) -> std::io::Result<Registry> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(std::io::Error::other),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Registry::default()),
            Err(error) => Err(error),
        }
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
    /// that a replacement gets a different one (addresses cycle after 250 servers).
    pub fn new_group_server(&mut self, role: Role, block: Cidr, release: &str) -> ServerRecord {
        let number = self
            .last_number
            .entry(role.as_str().to_owned())
            .or_insert(0);
        *number += 1;
        let subnet = if role == Role::Web {
            subnet::WEB
        } else {
            subnet::WORKER
        };
        let host = u8::try_from((*number - 1) % 250 + 1).expect("1..=250 fits");
        ServerRecord {
            id: format!("{}-{number}", role.as_str()),
            roles: vec![role.as_str().to_owned()],
            address: address(block, subnet, host),
            release: release.to_owned(),
            state: ServerState::Pending,
            beat: false,
        }
    }

    pub fn remove(&mut self, id: &str) {
        self.servers.retain(|server| server.id != id);
    }
}

/// The address `127.<block>.<subnet>.<host>`.
pub fn address(block: Cidr, subnet: u8, host: u8) -> Ipv4Addr {
    let [a, b, _, _] = block.addr.octets();
    Ipv4Addr::new(a, b, subnet, host)
}

/// Writes `bytes` to a temporary file beside `path` and renames it over `path`, so readers
/// never see half a file and a crash leaves either the old or the new one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&temporary, bytes)?;
    std::fs::rename(&temporary, path)
}

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
}
