//! The value of every optional key when `rigger.toml` leaves it out.
//!
//! docs/config.md documents the same values; the `full_example_in_docs` test keeps them honest.

use std::net::Ipv4Addr;

use crate::model::{CacheConfig, Cidr, DatabaseConfig, GroupSizing};

pub(crate) const HEALTH_CHECK_PATH: &str = "/healthcheck.html";
pub(crate) const REQUIREMENTS: &str = "requirements.txt";
pub(crate) const HTTP_PORT: u16 = 8080;
pub(crate) const HTTPS_PORT: u16 = 8443;
/// Average CPU (percent) the groups' target-tracking scaling policies aim at.
pub(crate) const CPU_TARGET: u32 = 50;
/// The user the Debian AMIs let in with the instance's key pair.
pub(crate) const DEPLOY_USER: &str = "admin";
pub(crate) const SSH_PORT: u16 = 22;

pub(crate) fn local_addresses() -> Cidr {
    Cidr {
        addr: Ipv4Addr::new(127, 77, 0, 0),
        prefix: 16,
    }
}

pub(crate) fn web() -> GroupSizing {
    GroupSizing {
        min: 2,
        max: 4,
        desired: 2,
        instance_type: "t3.small".to_owned(),
        volume_size: 20,
    }
}

pub(crate) fn worker() -> GroupSizing {
    GroupSizing {
        min: 1,
        max: 2,
        desired: 1,
        instance_type: "t3.small".to_owned(),
        volume_size: 20,
    }
}

pub(crate) fn database() -> DatabaseConfig {
    DatabaseConfig {
        replicas: 1,
        instance_type: "m5.large".to_owned(),
        volume_size: 50,
    }
}

pub(crate) fn cache() -> CacheConfig {
    CacheConfig {
        shared_with_queue: true,
        instance_type: "t3.medium".to_owned(),
        volume_size: 20,
    }
}
