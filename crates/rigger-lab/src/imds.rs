//! The instance metadata service at 169.254.169.254, answering each machine about itself.
//!
//! The emulator's own metadata paths answer static values (`i-fake`, no user-data), so the
//! lab answers instead: the runner listens on 169.254.169.254:80 inside the lab's network
//! namespace, and tells machines apart by the source address of the connection (each machine
//! holds exactly its instance's private address). IMDSv2 only, as with `HttpTokens=required`
//! (what rigger launches with): `PUT /latest/api/token` with a TTL of 1 to 21600 seconds gives
//! a token bound to the machine that asked (a request carrying `X-Forwarded-For` is refused,
//! as AWS refuses proxied token requests), and every `GET` must carry a live token of its
//! own machine, or it is answered 401.
//!
//! What is answered ([`tree`]): `meta-data/` (instance-id, local-ipv4, local-hostname,
//! hostname, ami-id, instance-type, mac, placement/availability-zone, placement/region,
//! public-keys/0/openssh-key, iam/info and iam/security-credentials/<role> with credentials
//! the emulator issued for the instance profile's role, services/domain and partition),
//! `user-data` (404 without), `dynamic/instance-identity/document`. Public addresses are never
//! answered: the emulator's are fake.
//!
//! [`respond`] is the whole protocol as a function of the request, the caller, the machines
//! and the clock, unit-tested below; [`serve`] is the HTTP/1.1 loop around it (request heads
//! parsed by `httparse`, bounded sizes and times, keep-alive).

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rigger_aws::lab::RoleCredentials;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The longest token life AWS grants (6 hours).
pub const MAX_TOKEN_TTL: u64 = 21_600;
/// A request head larger than this is refused.
const MAX_HEAD: usize = 16 * 1024;
/// A request body larger than this is refused (the service takes none).
const MAX_BODY: usize = 64 * 1024;
/// What is read and thrown away after refusing a request, before closing.
const MAX_DRAIN: usize = 1024 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a connection may take to send a request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The account every emulator resource belongs to (moto's default).
const ACCOUNT: &str = "123456789012";

/// What the service knows about one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineMetadata {
    pub instance_id: String,
    pub address: Ipv4Addr,
    pub ami_id: String,
    pub instance_type: String,
    pub availability_zone: String,
    pub region: String,
    /// `ip-172-31-0-4.ec2.internal`.
    pub local_hostname: String,
    pub mac: String,
    pub key_name: Option<String>,
    pub public_key: Option<String>,
    pub user_data: Option<Vec<u8>>,
    pub profile: Option<Profile>,
    /// The profile's role's credentials, renewed by the runner before they expire.
    pub credentials: Option<IssuedCredentials>,
}

/// An instance profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub arn: String,
    pub id: String,
}

/// Credentials and when they were issued (seconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCredentials {
    pub credentials: RoleCredentials,
    pub issued_at: i64,
}

/// The machines by address; the runner adds and removes them.
pub type Machines = Arc<RwLock<HashMap<Ipv4Addr, MachineMetadata>>>;

/// Live tokens: token -> (instance id, expiry).
#[derive(Debug, Default)]
pub struct Tokens {
    live: HashMap<String, (String, Instant)>,
}

impl Tokens {
    fn issue(&mut self, instance_id: &str, ttl: Duration, now: Instant) -> String {
        self.live.retain(|_, (_, expires)| *expires > now);
        let token = random_token();
        self.live
            .insert(token.clone(), (instance_id.to_owned(), now + ttl));
        token
    }

    fn valid(&self, token: &str, instance_id: &str, now: Instant) -> bool {
        self.live
            .get(token)
            .is_some_and(|(owner, expires)| owner == instance_id && *expires > now)
    }
}

/// 32 random bytes from the kernel, in hex.
fn random_token() -> String {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("reading /dev/urandom");
    crate::layout::hex(&bytes)
}

/// One request, as far as the service cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    fn text(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type: "text/plain",
            headers: Vec::new(),
            body: body.into(),
        }
    }

    fn reason(&self) -> &'static str {
        match self.status {
            200 => "OK",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            413 => "Payload Too Large",
            431 => "Request Header Fields Too Large",
            _ => "Error",
        }
    }

    fn encode(&self, head_only: bool, keep_alive: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nServer: EC2ws\r\nConnection: {}\r\n",
            self.status,
            self.reason(),
            self.content_type,
            self.body.len(),
            if keep_alive { "keep-alive" } else { "close" }
        );
        for (name, value) in &self.headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// Answers `request` from the machine at `from`.
pub fn respond(
    request: &Request,
    from: Ipv4Addr,
    machines: &HashMap<Ipv4Addr, MachineMetadata>,
    tokens: &mut Tokens,
    now: Instant,
    wall: SystemTime,
) -> Response {
    let Some(machine) = machines.get(&from) else {
        return Response::text(403, format!("{from} is not a lab machine"));
    };
    let path = request.path.split('?').next().unwrap_or_default();
    match request.method.as_str() {
        "PUT" if path == "/latest/api/token" => {
            if request.header("x-forwarded-for").is_some() {
                return Response::text(403, "token requests may not pass through a proxy");
            }
            let ttl = request
                .header("x-aws-ec2-metadata-token-ttl-seconds")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|ttl| (1..=MAX_TOKEN_TTL).contains(ttl));
            let Some(ttl) = ttl else {
                return Response::text(
                    400,
                    "X-aws-ec2-metadata-token-ttl-seconds must be 1 to 21600",
                );
            };
            let token = tokens.issue(&machine.instance_id, Duration::from_secs(ttl), now);
            let mut response = Response::text(200, token);
            response.headers.push((
                "X-Aws-Ec2-Metadata-Token-Ttl-Seconds".to_owned(),
                ttl.to_string(),
            ));
            response
        }
        "GET" | "HEAD" => {
            let authorised = request
                .header("x-aws-ec2-metadata-token")
                .is_some_and(|token| tokens.valid(token, &machine.instance_id, now));
            if !authorised {
                return Response::text(401, "");
            }
            let Some(rest) = path.strip_prefix("/latest/") else {
                return if path == "/" || path.is_empty() {
                    Response::text(200, "latest")
                } else {
                    Response::text(404, "Not Found")
                };
            };
            answer(&tree(machine, wall), rest)
        }
        "PUT" => Response::text(404, "Not Found"),
        _ => Response::text(405, "Method Not Allowed"),
    }
}

/// The value at `path` of `tree`, or the listing of the directory `path` names (children,
/// directories with a trailing `/`).
fn answer(tree: &BTreeMap<String, Leaf>, path: &str) -> Response {
    if let Some(leaf) = tree.get(path) {
        return Response {
            status: 200,
            content_type: leaf.content_type,
            headers: Vec::new(),
            body: leaf.body.clone(),
        };
    }
    // public-keys/ lists `0=<key name>`, not `0/`.
    if path.trim_end_matches('/') == "meta-data/public-keys"
        && let Some(listing) = tree.get("meta-data/public-keys/0=")
    {
        return Response::text(200, listing.body.clone());
    }
    let prefix = if path.is_empty() || path.ends_with('/') {
        path.to_owned()
    } else {
        format!("{path}/")
    };
    let mut children: Vec<String> = tree
        .keys()
        .filter_map(|key| key.strip_prefix(&prefix))
        .filter(|rest| !rest.ends_with('='))
        .map(|rest| match rest.split_once('/') {
            Some((dir, _)) => format!("{dir}/"),
            None => rest.to_owned(),
        })
        .collect();
    children.dedup();
    if children.is_empty() {
        Response::text(404, "Not Found")
    } else {
        Response::text(200, children.join("\n"))
    }
}

/// One answerable value.
struct Leaf {
    content_type: &'static str,
    body: Vec<u8>,
}

/// Everything `machine` may ask, by path under `/latest/`.
fn tree(machine: &MachineMetadata, wall: SystemTime) -> BTreeMap<String, Leaf> {
    let mut tree = BTreeMap::new();
    let mut text = |path: &str, value: &str| {
        tree.insert(
            path.to_owned(),
            Leaf {
                content_type: "text/plain",
                body: value.as_bytes().to_vec(),
            },
        );
    };
    let m = machine;
    let address = m.address.to_string();
    text("meta-data/ami-id", &m.ami_id);
    text("meta-data/ami-launch-index", "0");
    text("meta-data/hostname", &m.local_hostname);
    text("meta-data/instance-id", &m.instance_id);
    text("meta-data/instance-type", &m.instance_type);
    text("meta-data/local-hostname", &m.local_hostname);
    text("meta-data/local-ipv4", &address);
    text("meta-data/mac", &m.mac);
    text(
        "meta-data/placement/availability-zone",
        &m.availability_zone,
    );
    text("meta-data/placement/region", &m.region);
    text("meta-data/services/domain", "amazonaws.com");
    text("meta-data/services/partition", "aws");
    if let (Some(name), Some(key)) = (&m.key_name, &m.public_key) {
        text("meta-data/public-keys/0=", &format!("0={name}"));
        text("meta-data/public-keys/0/openssh-key", &format!("{key}\n"));
    }
    let now = iso8601(
        wall.duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64),
    );
    if let (Some(profile), Some(issued)) = (&m.profile, &m.credentials) {
        let c = &issued.credentials;
        let info = serde_json::json!({
            "Code": "Success",
            "LastUpdated": now,
            "InstanceProfileArn": profile.arn,
            "InstanceProfileId": profile.id,
        });
        text("meta-data/iam/info", &pretty(&info));
        let credentials = serde_json::json!({
            "Code": "Success",
            "LastUpdated": iso8601(issued.issued_at),
            "Type": "AWS-HMAC",
            "AccessKeyId": c.access_key_id,
            "SecretAccessKey": c.secret_access_key,
            "Token": c.session_token,
            "Expiration": iso8601(c.expiration),
        });
        text(
            &format!("meta-data/iam/security-credentials/{}", c.role_name),
            &pretty(&credentials),
        );
    }
    let document = serde_json::json!({
        "accountId": ACCOUNT,
        "architecture": "x86_64",
        "availabilityZone": m.availability_zone,
        "imageId": m.ami_id,
        "instanceId": m.instance_id,
        "instanceType": m.instance_type,
        "privateIp": address,
        "region": m.region,
        "version": "2017-09-30",
    });
    tree.insert(
        "dynamic/instance-identity/document".to_owned(),
        Leaf {
            content_type: "application/json",
            body: pretty(&document).into_bytes(),
        },
    );
    if let Some(user_data) = &m.user_data {
        tree.insert(
            "user-data".to_owned(),
            Leaf {
                content_type: "application/octet-stream",
                body: user_data.clone(),
            },
        );
    }
    tree
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// `2026-12-04T10:00:00Z` for `secs` seconds since the Unix epoch (before it: the epoch).
pub fn iso8601(secs: i64) -> String {
    rigger_plan::deploys::utc_iso8601(u64::try_from(secs).unwrap_or(0))
}

/// The service's shared state.
#[derive(Debug, Default)]
pub struct Service {
    pub machines: Machines,
    tokens: Mutex<Tokens>,
}

impl Service {
    pub fn new(machines: Machines) -> Service {
        Service {
            machines,
            tokens: Mutex::default(),
        }
    }
}

/// Serves connections from `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, service: Arc<Service>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let IpAddr::V4(from) = peer.ip() else {
                    continue;
                };
                let service = Arc::clone(&service);
                tokio::spawn(async move {
                    if let Err(error) = connection(stream, from, &service).await {
                        tracing::debug!(%from, %error, "metadata connection ended");
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "accepting a metadata connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One connection: requests until the client closes, asks to, or stalls.
async fn connection(
    mut stream: tokio::net::TcpStream,
    from: Ipv4Addr,
    service: &Service,
) -> std::io::Result<()> {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let parsed = loop {
            match parse_head(&buffer) {
                Head::Complete(request) => break Some(request),
                Head::Invalid(status) => {
                    let response = Response::text(status, "");
                    stream.write_all(&response.encode(false, false)).await?;
                    // Closing with unread input would reset the connection and could lose the
                    // answer: read (a bounded amount, for a bounded time) until the client is
                    // done.
                    stream.shutdown().await?;
                    let mut discarded = 0;
                    let mut chunk = [0u8; 4096];
                    while discarded < MAX_DRAIN {
                        match tokio::time::timeout(DRAIN_TIMEOUT, stream.read(&mut chunk)).await {
                            Ok(Ok(read)) if read > 0 => discarded += read,
                            _ => break,
                        }
                    }
                    return Ok(());
                }
                Head::Partial => {}
            }
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut chunk))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "idle"))??;
            if read == 0 {
                break None;
            }
            buffer.extend_from_slice(&chunk[..read]);
        };
        let Some(ParsedHead {
            request,
            head_len,
            body_len,
            keep_alive,
        }) = parsed
        else {
            return Ok(());
        };
        // Bodies are read and ignored: no request of this service has one.
        while buffer.len() < head_len + body_len {
            let mut chunk = [0u8; 4096];
            let read = tokio::time::timeout(READ_TIMEOUT, stream.read(&mut chunk))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "body"))??;
            if read == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..read]);
        }
        buffer.drain(..head_len + body_len);
        let response = {
            let machines = service.machines.read().expect("metadata lock");
            let mut tokens = service.tokens.lock().expect("token lock");
            respond(
                &request,
                from,
                &machines,
                &mut tokens,
                Instant::now(),
                SystemTime::now(),
            )
        };
        tracing::debug!(%from, method = %request.method, path = %request.path, status = response.status, "metadata");
        stream
            .write_all(&response.encode(request.method == "HEAD", keep_alive))
            .await?;
        if !keep_alive {
            return Ok(());
        }
    }
}

struct ParsedHead {
    request: Request,
    head_len: usize,
    body_len: usize,
    keep_alive: bool,
}

enum Head {
    Complete(ParsedHead),
    Partial,
    /// Refused with this status, then the connection is closed.
    Invalid(u16),
}

fn parse_head(buffer: &[u8]) -> Head {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buffer) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buffer.len() > MAX_HEAD => return Head::Invalid(431),
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(httparse::Error::TooManyHeaders) => return Head::Invalid(431),
        Err(_) => return Head::Invalid(400),
    };
    if head_len > MAX_HEAD {
        return Head::Invalid(431);
    }
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let find = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    if find("transfer-encoding").is_some() {
        return Head::Invalid(400);
    }
    let body_len = match find("content-length").map(|v| v.trim().parse::<usize>()) {
        None => 0,
        Some(Ok(len)) if len <= MAX_BODY => len,
        Some(Ok(_)) => return Head::Invalid(413),
        Some(Err(_)) => return Head::Invalid(400),
    };
    let connection = find("connection").unwrap_or_default();
    let keep_alive = match parsed.version {
        Some(1) => !connection.contains("close"),
        _ => connection.contains("keep-alive"),
    };
    Head::Complete(ParsedHead {
        request: Request {
            method: parsed.method.unwrap_or_default().to_owned(),
            path: parsed.path.unwrap_or_default().to_owned(),
            headers,
        },
        head_len,
        body_len,
        keep_alive,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WEB: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 4);
    const DB: Ipv4Addr = Ipv4Addr::new(172, 31, 16, 4);

    fn machine(id: &str, address: Ipv4Addr) -> MachineMetadata {
        MachineMetadata {
            instance_id: id.to_owned(),
            address,
            ami_id: "ami-0123456789abcdef0".to_owned(),
            instance_type: "t3.small".to_owned(),
            availability_zone: "us-east-1a".to_owned(),
            region: "us-east-1".to_owned(),
            local_hostname: "ip-172-31-0-4.ec2.internal".to_owned(),
            mac: "02:00:00:00:00:01".to_owned(),
            key_name: Some("lab".to_owned()),
            public_key: Some("ssh-ed25519 AAAA lab".to_owned()),
            user_data: Some(b"#!/bin/sh\necho hi\n".to_vec()),
            profile: Some(Profile {
                arn: "arn:aws:iam::123456789012:instance-profile/shop-web".to_owned(),
                id: "AIPA1".to_owned(),
            }),
            credentials: Some(IssuedCredentials {
                credentials: RoleCredentials {
                    role_name: "shop-web-role".to_owned(),
                    access_key_id: "ASIA1".to_owned(),
                    secret_access_key: "secret".to_owned(),
                    session_token: "session".to_owned(),
                    expiration: 1_800_000_000,
                },
                issued_at: 1_799_990_000,
            }),
        }
    }

    struct World {
        machines: HashMap<Ipv4Addr, MachineMetadata>,
        tokens: Tokens,
        now: Instant,
    }

    impl World {
        fn new() -> World {
            let machines = [
                (WEB, machine("i-0000000000000000a", WEB)),
                (DB, machine("i-0000000000000000b", DB)),
            ]
            .into_iter()
            .collect();
            World {
                machines,
                tokens: Tokens::default(),
                now: Instant::now(),
            }
        }

        fn ask(
            &mut self,
            from: Ipv4Addr,
            method: &str,
            path: &str,
            headers: &[(&str, &str)],
        ) -> Response {
            let request = Request {
                method: method.to_owned(),
                path: path.to_owned(),
                headers: headers
                    .iter()
                    .map(|(n, v)| (n.to_ascii_lowercase(), (*v).to_owned()))
                    .collect(),
            };
            respond(
                &request,
                from,
                &self.machines,
                &mut self.tokens,
                self.now,
                UNIX_EPOCH + Duration::from_secs(1_799_990_100),
            )
        }

        fn token(&mut self, from: Ipv4Addr, ttl: &str) -> String {
            let response = self.ask(
                from,
                "PUT",
                "/latest/api/token",
                &[("X-aws-ec2-metadata-token-ttl-seconds", ttl)],
            );
            assert_eq!(response.status, 200);
            String::from_utf8(response.body).unwrap()
        }

        fn get(&mut self, from: Ipv4Addr, token: &str, path: &str) -> (u16, String) {
            let response = self.ask(from, "GET", path, &[("X-aws-ec2-metadata-token", token)]);
            (
                response.status,
                String::from_utf8_lossy(&response.body).into_owned(),
            )
        }
    }

    #[test]
    fn each_machine_is_told_about_itself() {
        let mut world = World::new();
        let token = world.token(WEB, "300");
        assert_eq!(
            world.get(WEB, &token, "/latest/meta-data/instance-id"),
            (200, "i-0000000000000000a".to_owned())
        );
        assert_eq!(
            world.get(WEB, &token, "/latest/meta-data/local-ipv4"),
            (200, "172.31.0.4".to_owned())
        );
        let db_token = world.token(DB, "300");
        assert_eq!(
            world.get(DB, &db_token, "/latest/meta-data/instance-id"),
            (200, "i-0000000000000000b".to_owned())
        );
        assert_eq!(
            world.get(WEB, &token, "/latest/meta-data/placement/availability-zone"),
            (200, "us-east-1a".to_owned())
        );
        assert_eq!(
            world.get(WEB, &token, "/latest/user-data"),
            (200, "#!/bin/sh\necho hi\n".to_owned())
        );
        let (status, document) =
            world.get(WEB, &token, "/latest/dynamic/instance-identity/document");
        assert_eq!(status, 200);
        assert!(
            document.contains("\"privateIp\": \"172.31.0.4\""),
            "{document}"
        );
    }

    #[test]
    fn without_a_token_of_its_own_a_machine_is_refused() {
        let mut world = World::new();
        let response = world.ask(WEB, "GET", "/latest/meta-data/instance-id", &[]);
        assert_eq!(response.status, 401);
        assert_eq!(
            world.get(WEB, "made-up", "/latest/meta-data/instance-id").0,
            401
        );
        // Another machine's token is not this machine's.
        let db_token = world.token(DB, "300");
        assert_eq!(
            world.get(WEB, &db_token, "/latest/meta-data/instance-id").0,
            401
        );
        // Expired.
        let token = world.token(WEB, "1");
        world.now += Duration::from_secs(2);
        assert_eq!(
            world.get(WEB, &token, "/latest/meta-data/instance-id").0,
            401
        );
    }

    #[test]
    fn token_requests_follow_aws() {
        let mut world = World::new();
        for ttl in ["0", "21601", "soon"] {
            let response = world.ask(
                WEB,
                "PUT",
                "/latest/api/token",
                &[("X-aws-ec2-metadata-token-ttl-seconds", ttl)],
            );
            assert_eq!(response.status, 400, "ttl {ttl}");
        }
        assert_eq!(world.ask(WEB, "PUT", "/latest/api/token", &[]).status, 400);
        let proxied = world.ask(
            WEB,
            "PUT",
            "/latest/api/token",
            &[
                ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
                ("X-Forwarded-For", "172.31.0.9"),
            ],
        );
        assert_eq!(proxied.status, 403);
        let response = world.ask(
            WEB,
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
        );
        assert_eq!(response.status, 200);
        assert!(response.headers.iter().any(|(n, v)| {
            n.eq_ignore_ascii_case("x-aws-ec2-metadata-token-ttl-seconds") && v == "21600"
        }));
        // Strangers get nothing.
        let stranger = world.ask(
            Ipv4Addr::new(172, 31, 0, 99),
            "PUT",
            "/latest/api/token",
            &[("X-aws-ec2-metadata-token-ttl-seconds", "60")],
        );
        assert_eq!(stranger.status, 403);
    }

    #[test]
    fn directories_list_their_children() {
        let mut world = World::new();
        let token = world.token(WEB, "60");
        let (status, listing) = world.get(WEB, &token, "/latest/meta-data/");
        assert_eq!(status, 200);
        for entry in [
            "ami-id",
            "instance-id",
            "local-ipv4",
            "placement/",
            "public-keys/",
            "iam/",
        ] {
            assert!(listing.lines().any(|l| l == entry), "{entry} in {listing}");
        }
        assert!(!listing.contains("public-ipv4"));
        assert_eq!(
            world.get(WEB, &token, "/latest/meta-data/placement"),
            (200, "availability-zone\nregion".to_owned())
        );
        assert_eq!(
            world.get(WEB, &token, "/latest/meta-data/public-keys/"),
            (200, "0=lab".to_owned())
        );
        assert_eq!(
            world.get(WEB, &token, "/latest/meta-data/public-keys/0/openssh-key"),
            (200, "ssh-ed25519 AAAA lab\n".to_owned())
        );
        assert_eq!(
            world.get(WEB, &token, "/latest/meta-data/public-ipv4").0,
            404
        );
        assert_eq!(world.get(WEB, &token, "/latest/nothing").0, 404);
    }

    #[test]
    fn credentials_of_the_profile_role() {
        let mut world = World::new();
        let token = world.token(WEB, "60");
        assert_eq!(
            world.get(WEB, &token, "/latest/meta-data/iam/security-credentials/"),
            (200, "shop-web-role".to_owned())
        );
        let (status, body) = world.get(
            WEB,
            &token,
            "/latest/meta-data/iam/security-credentials/shop-web-role",
        );
        assert_eq!(status, 200);
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["AccessKeyId"], "ASIA1");
        assert_eq!(json["Token"], "session");
        assert_eq!(json["Expiration"], "2027-01-15T08:00:00Z");
        // Without a profile there is no iam/ at all, and no user-data is a 404.
        let bare = world.machines.get_mut(&DB).unwrap();
        bare.profile = None;
        bare.user_data = None;
        let token = world.token(DB, "60");
        assert_eq!(world.get(DB, &token, "/latest/meta-data/iam/info").0, 404);
        assert_eq!(world.get(DB, &token, "/latest/user-data").0, 404);
    }

    #[test]
    fn dates() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_800_000_000), "2027-01-15T08:00:00Z");
    }

    #[test]
    fn request_heads() {
        let Head::Complete(head) = parse_head(
            b"PUT /latest/api/token HTTP/1.1\r\nHost: 169.254.169.254\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\nContent-Length: 3\r\n\r\nabc",
        ) else {
            panic!("complete")
        };
        assert_eq!(head.request.method, "PUT");
        assert_eq!(head.body_len, 3);
        assert!(head.keep_alive);
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Head::Partial
        ));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.0\r\n\r\n"),
            Head::Complete(ParsedHead {
                keep_alive: false,
                ..
            })
        ));
        assert!(matches!(
            parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n"),
            Head::Complete(ParsedHead {
                keep_alive: false,
                ..
            })
        ));
        assert!(matches!(
            parse_head(b"\x01\x02 nonsense\r\n\r\n"),
            Head::Invalid(400)
        ));
        assert!(matches!(
            parse_head(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Head::Invalid(400)
        ));
        assert!(matches!(
            parse_head(b"PUT / HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            Head::Invalid(413)
        ));
        let huge = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD + 10));
        assert!(matches!(parse_head(huge.as_bytes()), Head::Invalid(431)));
    }
}
