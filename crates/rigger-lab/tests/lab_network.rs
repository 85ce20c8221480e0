//! The lab's network on the real kernel (root, `ip`): the address machines use for the
//! router, the metadata service and the resolver stays reachable while other machines come
//! and go. Namespaces are named after this process, so parallel runs do not meet, and are
//! removed at the end whatever happens.

use std::net::Ipv4Addr;
use std::process::Command;

use rigger_config::Cidr;
use rigger_lab::net::{self, MachineLink};

struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = Command::new("ip").args(["netns", "delete", name]).status();
        }
    }
}

fn ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        output.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The MAC address of `device` in namespace `ns`.
fn mac(ns: &str, device: &str) -> String {
    let shown = ip(&["-n", ns, "-o", "link", "show", device]);
    let after = shown
        .split("link/ether ")
        .nth(1)
        .expect("an ethernet device");
    after.split_whitespace().next().unwrap().to_owned()
}

/// What `ns` has learnt for `address`'s link-layer address, if anything.
fn neighbour(ns: &str, address: Ipv4Addr) -> Option<String> {
    let shown = ip(&["-n", ns, "neigh", "show", &address.to_string()]);
    let after = shown.split("lladdr ").nth(1)?;
    after.split_whitespace().next().map(str::to_owned)
}

#[tokio::test]
async fn the_bridge_keeps_its_address_while_machines_come_and_go() {
    let id = std::process::id();
    let lab = format!("rigger-labnet-{id}");
    let vpc: Cidr = "172.31.0.0/16".parse().unwrap();
    let machine_ns = |n: u64| format!("rigger-labnet-{id}-m{n}");
    let mut cleanup = Namespaces(vec![lab.clone()]);
    net::create_lab(&lab, vpc).await.expect("the lab's network");
    let before = mac(&lab, "br0");

    cleanup.0.push(machine_ns(1));
    net::create_machine(&MachineLink {
        lab_namespace: lab.clone(),
        namespace: machine_ns(1),
        port: net::bridge_port(1),
        mac: "02:00:00:00:01:01".to_owned(),
        address: Ipv4Addr::new(172, 31, 0, 11),
        vpc,
    })
    .await
    .expect("machine 1");
    // Machine 1 learns the metadata service's link-layer address, as at boot: a connection
    // attempt (nothing listens here, so it is refused at once) resolves it first.
    let attempt = Command::new("ip")
        .args(["netns", "exec", &machine_ns(1), "bash", "-c"])
        .arg(format!(
            "timeout 2 bash -c '</dev/tcp/{}/80' 2>/dev/null; true",
            net::METADATA_ADDRESS
        ))
        .status()
        .unwrap();
    assert!(attempt.success());
    let learnt = neighbour(&machine_ns(1), net::METADATA_ADDRESS)
        .expect("machine 1 resolved the metadata service's address");
    assert_eq!(learnt, before);

    // Other machines' bridge ports come and go, with addresses lower than any other port's:
    // a bridge that followed its lowest port would change its own each time.
    for n in 2..6 {
        let port = net::bridge_port(n);
        let low = format!("02:00:00:00:00:{n:02x}");
        ip(&[
            "-n",
            &lab,
            "link",
            "add",
            &port,
            "address",
            &low,
            "type",
            "veth",
            "peer",
            "name",
            &format!("peer{n}"),
        ]);
        ip(&["-n", &lab, "link", "set", &port, "master", "br0", "up"]);
        assert_eq!(mac(&lab, "br0"), before, "after port {n} came");
    }
    for n in 2..6 {
        ip(&["-n", &lab, "link", "delete", &net::bridge_port(n)]);
        assert_eq!(mac(&lab, "br0"), before, "after port {n} went");
    }
    // What machine 1 learnt at boot is still the bridge's.
    assert_eq!(mac(&lab, "br0"), learnt);
}
