//! The metadata service's HTTP, with a real client: the service on a loopback port, curl
//! asking as the machine at 127.0.0.1 (in the lab it listens on 169.254.169.254 and machines
//! ask from their private address). Keep-alive, pipelining, HEAD and refused requests.

use std::collections::HashMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rigger_lab::imds::{MachineMetadata, Service, serve};

const MACHINE: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A runtime serving the metadata of one machine at 127.0.0.1, and the port.
fn start() -> (tokio::runtime::Runtime, u16) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let machines = Arc::new(RwLock::new(HashMap::from([(
        MACHINE,
        MachineMetadata {
            instance_id: "i-0123456789abcdef0".to_owned(),
            address: MACHINE,
            ami_id: "ami-0123456789abcdef0".to_owned(),
            instance_type: "t3.micro".to_owned(),
            availability_zone: "us-east-1a".to_owned(),
            region: "us-east-1".to_owned(),
            local_hostname: "ip-127-0-0-1.ec2.internal".to_owned(),
            mac: "02:00:00:00:00:01".to_owned(),
            key_name: None,
            public_key: None,
            user_data: Some(vec![0x1f, 0x8b, 0, 1, 2, 255]),
            profile: None,
            credentials: None,
        },
    )])));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind((MACHINE, 0)))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    runtime.spawn(serve(listener, Arc::new(Service::new(machines))));
    (runtime, port)
}

fn curl(args: &[&str]) -> (bool, String) {
    let output = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl is installed (scripts/install-packages.sh)");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

fn token(port: u16) -> String {
    let (ok, token) = curl(&[
        "-f",
        "-X",
        "PUT",
        "-H",
        "X-aws-ec2-metadata-token-ttl-seconds: 60",
        &format!("http://127.0.0.1:{port}/latest/api/token"),
    ]);
    assert!(ok && token.len() == 64, "token: {token:?}");
    token
}

#[test]
fn curl_gets_what_the_machine_may_ask() {
    let (_runtime, port) = start();
    let url = |path: &str| format!("http://127.0.0.1:{port}/latest/{path}");
    let (_, refused) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &url("meta-data/instance-id"),
    ]);
    assert_eq!(refused, "401");
    let token = token(port);
    let header = format!("X-aws-ec2-metadata-token: {token}");
    // Two requests on one connection: the second makes no new connection.
    let (ok, out) = curl(&[
        "-H",
        &header,
        "-w",
        " connects=%{num_connects}\n",
        &url("meta-data/instance-id"),
        &url("meta-data/local-ipv4"),
    ]);
    assert!(ok, "{out}");
    assert_eq!(
        out,
        "i-0123456789abcdef0 connects=1\n127.0.0.1 connects=0\n"
    );
    // User-data comes back byte for byte (gzip is the client's business).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("user-data");
    let (ok, _) = curl(&[
        "-f",
        "-H",
        &header,
        "-o",
        file.to_str().unwrap(),
        &url("user-data"),
    ]);
    assert!(ok);
    assert_eq!(
        std::fs::read(&file).unwrap(),
        vec![0x1f, 0x8b, 0, 1, 2, 255]
    );
    // HEAD: the headers alone.
    let (ok, head) = curl(&["-I", "-H", &header, &url("meta-data/instance-id")]);
    assert!(ok, "{head}");
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("Content-Length: 19"), "{head}");
}

/// Sends `bytes` on a new connection and reads until the server closes it.
fn raw(port: u16, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect((MACHINE, port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let (_runtime, port) = start();
    let token = token(port);
    let request = |path: &str, close: bool| {
        format!(
            "GET /latest/meta-data/{path} HTTP/1.1\r\nHost: x\r\nX-aws-ec2-metadata-token: {token}\r\n{}\r\n",
            if close { "Connection: close\r\n" } else { "" }
        )
    };
    let answer = raw(
        port,
        format!(
            "{}{}",
            request("instance-id", false),
            request("placement/region", true)
        )
        .as_bytes(),
    );
    let first = answer.find("i-0123456789abcdef0").expect(&answer);
    let second = answer.find("us-east-1").expect(&answer);
    assert!(first < second, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
}

#[test]
fn bad_requests_are_refused_and_closed() {
    let (_runtime, port) = start();
    let huge = format!(
        "GET /latest/meta-data/{} HTTP/1.1\r\nHost: x\r\n\r\n",
        "a".repeat(20_000)
    );
    assert!(raw(port, huge.as_bytes()).starts_with("HTTP/1.1 431 "));
    assert!(raw(port, b"\x16\x03\x01 not http\r\n\r\n").starts_with("HTTP/1.1 400 "));
    let chunked = b"PUT /latest/api/token HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
    assert!(raw(port, chunked).starts_with("HTTP/1.1 400 "));
    let proxied = b"PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nX-Forwarded-For: 10.0.0.1\r\nConnection: close\r\n\r\n";
    assert!(raw(port, proxied).starts_with("HTTP/1.1 403 "));
}
