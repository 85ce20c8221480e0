//! The lab's network, made only of network namespaces the lab creates, with no link to this
//! machine's own network:
//!
//! - the lab's namespace (`rigger-lab-<id>`) holds a bridge carrying the emulator's default
//!   VPC range (`172.31.0.0/16`), with the VPC router's address (`172.31.0.1`, which AWS
//!   reserves in every subnet's first block, so no instance gets it) from which this machine
//!   reaches the machines (`ip netns exec rigger-lab-<id> ssh ...`), the address of the lab's
//!   front to the AWS API ([`Vpc::front`], where the resolver sends `*.amazonaws.com`), and
//!   the link-local addresses of the instance metadata service (169.254.169.254) and of the
//!   VPC's DNS resolver (169.254.169.253);
//! - each machine has a namespace of its own with one interface, `eth0`, a veth whose other
//!   end is on the bridge, holding exactly the private address the emulator assigned, and
//!   on-link routes to the VPC and to the two link-local services. No default route.
//!
//! So a packet to any other address fails where it is sent (no route), nothing is forwarded
//! (forwarding is off in every namespace, and no namespace has a way out), IPv6 is off, and the
//! public addresses the emulator hands out are never configured anywhere.

use std::net::Ipv4Addr;

use anyhow::bail;

use crate::sys::run;

/// The instance metadata service's address.
pub const METADATA_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The VPC's DNS resolver's link-local address (Route 53 Resolver's on AWS), where the lab's
/// resolver ([`crate::dns`]) answers and the image's `/etc/resolv.conf` points.
pub const RESOLVER_ADDRESS: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 253);
/// The bridge in the lab's namespace.
const BRIDGE: &str = "br0";
/// The bridge's MAC address, set when it is made. A bridge left to itself takes the lowest
/// MAC address among its ports and changes it whenever a port with a lower one comes or the
/// holder goes: every machine's neighbour entry for the router, the metadata service and the
/// resolver then points nowhere until it goes stale and is probed again (tens of seconds of
/// timeouts at boot, seen as "Unable to locate credentials" and failed metadata requests).
/// Locally administered ("rigger" in ASCII; a machine's digest-derived address equals it
/// with a chance of one in 2^40).
const BRIDGE_MAC: &str = "02:72:69:67:67:72";

/// An IPv4 network: the project's one type for them.
pub use rigger_config::Cidr;

/// What the lab makes of its VPC's network.
pub trait Vpc {
    /// The VPC router's address: the network's first host.
    fn router(&self) -> Ipv4Addr;
    /// The address of the lab's front to the AWS API ([`crate::front`]): the network's fourth
    /// address. AWS reserves the first four addresses of every subnet (network, router, DNS,
    /// "future use"), and moto keeps them too; a subnet holding this address must start at
    /// the network's base (subnets are aligned blocks of /28 or more), so it is the fourth
    /// address of whichever subnet holds it and no instance ever gets it, whatever subnets
    /// are made. (An address merely outside the default subnets would be free for a subnet
    /// created later to hand out.)
    fn front(&self) -> Ipv4Addr;
    /// Whether the whole network is private address space (RFC 1918).
    fn is_private(&self) -> bool;
    /// Why `address` cannot be a machine's on this network, if it cannot: outside it, its
    /// network or broadcast address, or the lab's own (the router's, the front's).
    fn refuse_machine_address(&self, address: Ipv4Addr) -> Option<String>;
}

impl Vpc for Cidr {
    fn router(&self) -> Ipv4Addr {
        self.nth(1).unwrap_or(self.addr)
    }

    fn front(&self) -> Ipv4Addr {
        self.nth(3).unwrap_or(self.addr)
    }

    fn is_private(&self) -> bool {
        ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
            .iter()
            .any(|range| range.parse::<Cidr>().expect("constant").contains(self))
    }

    fn refuse_machine_address(&self, address: Ipv4Addr) -> Option<String> {
        if !self.contains_address(address) {
            Some(format!("{address} is outside the lab's network {self}"))
        } else if address == self.addr || address == self.broadcast() {
            Some(format!(
                "{address} is the network's own address, not a host's"
            ))
        } else if address == self.router() {
            Some(format!(
                "{address} is the VPC router's address, which the lab holds"
            ))
        } else if address == self.front() {
            Some(format!(
                "{address} is reserved in its subnet, and the lab's front to the AWS API holds it"
            ))
        } else {
            None
        }
    }
}

/// The lab's side of a machine's link, in the lab's namespace; `index` is the runner's
/// count of machines started (interface names have at most 15 characters, instance ids 19).
pub fn bridge_port(index: u64) -> String {
    format!("vm{index}")
}

/// The MAC address of an instance's `eth0`, as the metadata service reports it: locally
/// administered, derived from the instance id.
pub fn mac_address(instance_id: &str) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(instance_id.as_bytes());
    format!(
        "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        digest[0], digest[1], digest[2], digest[3], digest[4]
    )
}

/// Network namespaces that exist now (the names under /run/netns).
pub fn namespaces() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// Sets the sysctls every lab namespace has: no forwarding, no IPv6.
async fn isolate(namespace: &str) -> anyhow::Result<()> {
    run(
        "ip",
        &[
            "netns",
            "exec",
            namespace,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=0",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ],
    )
    .await
    .map(drop)
}

/// Creates the lab's namespace and bridge for `vpc` (a private range).
pub async fn create_lab(namespace: &str, vpc: Cidr) -> anyhow::Result<()> {
    if !vpc.is_private() {
        bail!(
            "the lab's network {vpc} is not private address space (RFC 1918); refusing to carry it"
        );
    }
    run("ip", &["netns", "add", namespace]).await?;
    isolate(namespace).await?;
    let router = format!("{}/{}", vpc.router(), vpc.prefix);
    let front = format!("{}/32", vpc.front());
    let metadata = format!("{METADATA_ADDRESS}/32");
    let resolver = format!("{RESOLVER_ADDRESS}/32");
    let steps: [&[&str]; 7] = [
        &["link", "set", "lo", "up"],
        &[
            "link", "add", BRIDGE, "address", BRIDGE_MAC, "type", "bridge",
        ],
        &["addr", "add", &router, "dev", BRIDGE],
        &["addr", "add", &front, "dev", BRIDGE],
        &["addr", "add", &metadata, "dev", BRIDGE],
        &["addr", "add", &resolver, "dev", BRIDGE],
        &["link", "set", BRIDGE, "up"],
    ];
    for step in steps {
        let mut args = vec!["-n", namespace];
        args.extend_from_slice(step);
        run("ip", &args).await?;
    }
    Ok(())
}

/// One machine's link: what [`create_machine`] sets up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineLink {
    pub lab_namespace: String,
    pub namespace: String,
    /// The bridge port's name ([`bridge_port`]).
    pub port: String,
    pub mac: String,
    pub address: Ipv4Addr,
    pub vpc: Cidr,
}

/// Creates the machine's namespace with `eth0` on the lab's bridge.
pub async fn create_machine(link: &MachineLink) -> anyhow::Result<()> {
    let ns = link.namespace.as_str();
    let lab = link.lab_namespace.as_str();
    run("ip", &["netns", "add", ns]).await?;
    isolate(ns).await?;
    run(
        "ip",
        &[
            "-n", lab, "link", "add", &link.port, "type", "veth", "peer", "name", "eth0",
            "address", &link.mac, "netns", ns,
        ],
    )
    .await?;
    run(
        "ip",
        &["-n", lab, "link", "set", &link.port, "master", BRIDGE, "up"],
    )
    .await?;
    let address = format!("{}/{}", link.address, link.vpc.prefix);
    let metadata = format!("{METADATA_ADDRESS}/32");
    let resolver = format!("{RESOLVER_ADDRESS}/32");
    let steps: [&[&str]; 5] = [
        &["link", "set", "lo", "up"],
        &["addr", "add", &address, "dev", "eth0"],
        &["link", "set", "eth0", "up"],
        &["route", "add", &metadata, "dev", "eth0"],
        &["route", "add", &resolver, "dev", "eth0"],
    ];
    for step in steps {
        let mut args = vec!["-n", ns];
        args.extend_from_slice(step);
        run("ip", &args).await?;
    }
    Ok(())
}

/// Deletes network namespace `name` (its interfaces go with it; a veth's peer too); nothing
/// when it does not exist.
pub async fn remove_namespace(name: &str) -> anyhow::Result<()> {
    if !namespaces().iter().any(|n| n == name) {
        return Ok(());
    }
    run("ip", &["netns", "delete", name]).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let vpc: Cidr = "172.31.0.0/16".parse().unwrap();
        assert!(vpc.is_private());
        assert!(vpc.contains_address("172.31.200.4".parse().unwrap()));
        assert!(!vpc.contains_address("172.32.0.4".parse().unwrap()));
        assert_eq!(vpc.router(), Ipv4Addr::new(172, 31, 0, 1));
        assert_eq!(vpc.front(), Ipv4Addr::new(172, 31, 0, 3));
        assert_eq!(vpc.broadcast(), Ipv4Addr::new(172, 31, 255, 255));
        assert_eq!(vpc.to_string(), "172.31.0.0/16");
        assert!(
            vpc.refuse_machine_address("172.31.0.4".parse().unwrap())
                .is_none()
        );
        for refused in [
            "172.31.0.0",
            "172.31.0.1",
            "172.31.0.3",
            "172.31.255.255",
            "10.0.0.4",
            "54.1.2.3",
        ] {
            assert!(
                vpc.refuse_machine_address(refused.parse().unwrap())
                    .is_some(),
                "{refused}"
            );
        }
        assert!("10.99.0.0/16".parse::<Cidr>().unwrap().is_private());
        assert!("192.168.4.0/24".parse::<Cidr>().unwrap().is_private());
        assert!(!"172.0.0.0/8".parse::<Cidr>().unwrap().is_private());
        assert!(!"54.0.0.0/16".parse::<Cidr>().unwrap().is_private());
        assert!("172.31.0.1/16".parse::<Cidr>().is_err());
        assert!("172.31.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }

    #[test]
    fn macs_are_locally_administered_and_stable() {
        let mac = mac_address("i-0123456789abcdef0");
        assert!(mac.starts_with("02:"));
        assert_eq!(mac.len(), 17);
        assert_eq!(mac, mac_address("i-0123456789abcdef0"));
        assert_ne!(mac, mac_address("i-0123456789abcdef1"));
    }
}
