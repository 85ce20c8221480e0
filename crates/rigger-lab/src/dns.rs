//! The VPC's DNS resolver, as the lab answers it: on 169.254.169.253:53 (UDP and TCP) in the
//! lab's namespace, where machines' `/etc/resolv.conf` (the image's) points, as on EC2.
//!
//! It knows four kinds of names and nothing else:
//! - every name under `amazonaws.com` is the lab's front ([`crate::front`]), so the AWS CLI in
//!   a machine reaches the emulator at the real host names (it ignores endpoint variables);
//! - the names of Debian's archive ([`crate::front::ARCHIVE_NAMES`]) are the front's address
//!   too, where the lab's package mirror answers plain HTTP, so apt in a machine installs
//!   from Debian's archive as on EC2 (and reaches nothing else);
//! - a machine's EC2 name (`ip-172-31-0-4.ec2.internal`, `ip-....<region>.compute.internal`,
//!   as its metadata service's `local-hostname` says) is its private address;
//! - anything else does not exist (NXDOMAIN), answered at once: machines reach nothing outside
//!   the lab, so a lookup of PyPI fails now instead of after a timeout.
//!
//! Only standard queries of class IN with one question are answered; other types of a known
//! name get an empty answer (as a resolver says for a name with no such record). [`respond`]
//! is the whole protocol as a function of a packet, unit-tested below; [`serve_udp`] and
//! [`serve_tcp`] are the loops around it.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::imds::Machines;

/// The DNS port.
pub const PORT: u16 = 53;
/// How long answers may be cached: the front's address never changes while the lab is up,
/// and machines' names follow their instances.
const TTL_SECONDS: u32 = 60;
/// How long a TCP client may take to send a query.
const TCP_READ_TIMEOUT: Duration = Duration::from_secs(10);

const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const CLASS_IN: u16 = 1;

const RCODE_FORMAT_ERROR: u8 = 1;
const RCODE_NAME_ERROR: u8 = 3;
const RCODE_NOT_IMPLEMENTED: u8 = 4;
const RCODE_REFUSED: u8 = 5;

/// What a name is, for the resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The name exists and has this IPv4 address.
    Address(Ipv4Addr),
    /// The name does not exist.
    NoSuchName,
}

/// The names a resolver knows: `name` is lower-case, without the final dot.
pub trait Zone: Send + Sync {
    fn lookup(&self, name: &str) -> Lookup;
}

/// The lab's names: the AWS API and the package mirror at the front, machines at their
/// addresses.
pub struct LabZone {
    pub front: Ipv4Addr,
    pub machines: Machines,
}

impl Zone for LabZone {
    fn lookup(&self, name: &str) -> Lookup {
        if name == "amazonaws.com"
            || name.ends_with(".amazonaws.com")
            || crate::front::ARCHIVE_NAMES.contains(&name)
        {
            return Lookup::Address(self.front);
        }
        let machines = self.machines.read().expect("metadata lock");
        machines
            .values()
            .find(|m| m.local_hostname.eq_ignore_ascii_case(name))
            .map_or(Lookup::NoSuchName, |m| Lookup::Address(m.address))
    }
}

/// The answer to DNS message `query`, or `None` when it gets none (too short to carry an id,
/// or itself an answer).
pub fn respond(query: &[u8], zone: &dyn Zone) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let id = [query[0], query[1]];
    let flags = query[2];
    if flags & 0x80 != 0 {
        return None; // QR: a response, not a query.
    }
    let opcode = (flags >> 3) & 0x0f;
    let recursion_desired = flags & 0x01;
    let header = |rcode: u8, questions: u16, answers: u16| {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(&id);
        // QR, the query's opcode, AA (the lab is the authority for what it answers), RD as
        // asked; RA; the result code.
        out.push(0x80 | (opcode << 3) | 0x04 | recursion_desired);
        out.push(0x80 | rcode);
        out.extend_from_slice(&questions.to_be_bytes());
        out.extend_from_slice(&answers.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0]);
        out
    };
    if opcode != 0 {
        return Some(header(RCODE_NOT_IMPLEMENTED, 0, 0));
    }
    let question_count = u16::from_be_bytes([query[4], query[5]]);
    if question_count != 1 {
        return Some(header(RCODE_FORMAT_ERROR, 0, 0));
    }
    let Some(question) = parse_question(&query[12..]) else {
        return Some(header(RCODE_FORMAT_ERROR, 0, 0));
    };
    let raw_question = &query[12..12 + question.length];
    let (rcode, address) = if question.class != CLASS_IN {
        (RCODE_REFUSED, None)
    } else {
        match zone.lookup(&question.name) {
            Lookup::NoSuchName => (RCODE_NAME_ERROR, None),
            Lookup::Address(address) => (
                0,
                matches!(question.kind, TYPE_A | TYPE_ANY).then_some(address),
            ),
        }
    };
    let mut out = header(rcode, 1, u16::from(address.is_some()));
    out.extend_from_slice(raw_question);
    if let Some(address) = address {
        out.extend_from_slice(&[0xc0, 12]); // the name: a pointer to the question's
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&TTL_SECONDS.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&address.octets());
    }
    Some(out)
}

/// A query's question.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Question {
    /// Lower-case, dot-separated, without the final dot.
    name: String,
    kind: u16,
    class: u16,
    /// Its length in the message.
    length: usize,
}

/// Parses the question at the start of `bytes`: labels (no compression: a query's one
/// question has nothing to point back to), type, class.
fn parse_question(bytes: &[u8]) -> Option<Question> {
    let mut labels: Vec<String> = Vec::new();
    let mut at = 0;
    let mut name_length = 0;
    loop {
        let length = usize::from(*bytes.get(at)?);
        at += 1;
        if length == 0 {
            break;
        }
        if length > 63 {
            return None; // a compression pointer, or a reserved label type
        }
        let label = bytes.get(at..at + length)?;
        name_length += length + 1;
        if name_length > 255 {
            return None;
        }
        labels.push(
            label
                .iter()
                .map(|b| char::from(b.to_ascii_lowercase()))
                .collect(),
        );
        at += length;
    }
    let fixed = bytes.get(at..at + 4)?;
    Some(Question {
        name: labels.join("."),
        kind: u16::from_be_bytes([fixed[0], fixed[1]]),
        class: u16::from_be_bytes([fixed[2], fixed[3]]),
        length: at + 4,
    })
}

/// Answers queries on `socket` until the runner exits.
pub async fn serve_udp(socket: tokio::net::UdpSocket, zone: Arc<dyn Zone>) {
    let mut buffer = vec![0u8; 4096];
    loop {
        let (length, peer) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(error) => {
                tracing::warn!(%error, "dns: receiving");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some(answer) = respond(&buffer[..length], zone.as_ref())
            && let Err(error) = socket.send_to(&answer, peer).await
        {
            tracing::debug!(%peer, %error, "dns: answering");
        }
    }
}

/// Answers queries over TCP (each prefixed with its length) from `listener` until the runner
/// exits.
pub async fn serve_tcp(listener: tokio::net::TcpListener, zone: Arc<dyn Zone>) {
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "dns: accepting");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let zone = Arc::clone(&zone);
        tokio::spawn(async move {
            loop {
                let mut length = [0u8; 2];
                let read = tokio::time::timeout(TCP_READ_TIMEOUT, async {
                    stream.read_exact(&mut length).await?;
                    let mut query = vec![0u8; usize::from(u16::from_be_bytes(length))];
                    stream.read_exact(&mut query).await?;
                    Ok::<_, std::io::Error>(query)
                })
                .await;
                let Ok(Ok(query)) = read else { return };
                let Some(answer) = respond(&query, zone.as_ref()) else {
                    return;
                };
                let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                framed.extend_from_slice(&answer);
                if stream.write_all(&framed).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TestZone;

    impl Zone for TestZone {
        fn lookup(&self, name: &str) -> Lookup {
            match name {
                "ssm.us-east-1.amazonaws.com" => Lookup::Address(Ipv4Addr::new(172, 31, 0, 3)),
                _ => Lookup::NoSuchName,
            }
        }
    }

    fn query(id: u16, name: &str, kind: u16) -> Vec<u8> {
        let mut out = id.to_be_bytes().to_vec();
        out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
        for label in name.split('.') {
            out.push(label.len() as u8);
            out.extend_from_slice(label.as_bytes());
        }
        out.push(0);
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out
    }

    fn rcode(answer: &[u8]) -> u8 {
        answer[3] & 0x0f
    }

    fn answer_count(answer: &[u8]) -> u16 {
        u16::from_be_bytes([answer[6], answer[7]])
    }

    #[test]
    fn an_aws_name_is_the_front_whatever_its_case() {
        let asked = query(0xbeef, "SSM.us-east-1.AmazonAWS.com", TYPE_A);
        let answer = respond(&asked, &TestZone).unwrap();
        assert_eq!(&answer[..2], &[0xbe, 0xef], "the query's id");
        assert_eq!(answer[2] & 0x80, 0x80, "a response");
        assert_eq!(answer[2] & 0x01, 0x01, "recursion desired, as asked");
        assert_eq!(rcode(&answer), 0);
        assert_eq!(answer_count(&answer), 1);
        // The question comes back as asked (case included), then the record.
        let question = &asked[12..];
        assert_eq!(&answer[12..12 + question.len()], question);
        let record = &answer[12 + question.len()..];
        assert_eq!(
            record,
            &[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 172, 31, 0, 3]
        );
    }

    #[test]
    fn other_types_of_a_known_name_are_empty_and_unknown_names_do_not_exist() {
        let aaaa = respond(&query(1, "ssm.us-east-1.amazonaws.com", 28), &TestZone).unwrap();
        assert_eq!((rcode(&aaaa), answer_count(&aaaa)), (0, 0));
        let unknown = respond(&query(2, "deb.debian.org", TYPE_A), &TestZone).unwrap();
        assert_eq!(
            (rcode(&unknown), answer_count(&unknown)),
            (RCODE_NAME_ERROR, 0)
        );
        let unknown = respond(&query(3, "deb.debian.org", 28), &TestZone).unwrap();
        assert_eq!(rcode(&unknown), RCODE_NAME_ERROR);
    }

    #[test]
    fn malformed_and_unusual_messages() {
        assert_eq!(respond(&[0; 11], &TestZone), None, "shorter than a header");
        let mut response = query(1, "a.b", TYPE_A);
        response[2] |= 0x80;
        assert_eq!(
            respond(&response, &TestZone),
            None,
            "a response is not answered"
        );
        let mut notify = query(1, "a.b", TYPE_A);
        notify[2] |= 4 << 3;
        assert_eq!(
            rcode(&respond(&notify, &TestZone).unwrap()),
            RCODE_NOT_IMPLEMENTED
        );
        let mut two = query(1, "a.b", TYPE_A);
        two[5] = 2;
        assert_eq!(
            rcode(&respond(&two, &TestZone).unwrap()),
            RCODE_FORMAT_ERROR
        );
        let truncated = query(1, "ssm.us-east-1.amazonaws.com", TYPE_A);
        let truncated = &truncated[..truncated.len() - 3];
        assert_eq!(
            rcode(&respond(truncated, &TestZone).unwrap()),
            RCODE_FORMAT_ERROR
        );
        let mut pointer = query(1, "a", TYPE_A);
        pointer[12] = 0xc0;
        assert_eq!(
            rcode(&respond(&pointer, &TestZone).unwrap()),
            RCODE_FORMAT_ERROR
        );
        let long = vec!["a".repeat(63); 5].join(".");
        assert_eq!(
            rcode(&respond(&query(1, &long, TYPE_A), &TestZone).unwrap()),
            RCODE_FORMAT_ERROR,
            "names are at most 255 bytes"
        );
        let mut chaos = query(1, "version.bind", 16);
        let end = chaos.len();
        chaos[end - 1] = 3;
        assert_eq!(rcode(&respond(&chaos, &TestZone).unwrap()), RCODE_REFUSED);
        // An EDNS record in the additional section is ignored; the answer carries none.
        let mut edns = query(7, "ssm.us-east-1.amazonaws.com", TYPE_A);
        edns[11] = 1;
        edns.extend_from_slice(&[0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0]);
        let answer = respond(&edns, &TestZone).unwrap();
        assert_eq!((rcode(&answer), answer_count(&answer)), (0, 1));
        assert_eq!(&answer[10..12], &[0, 0]);
    }

    #[test]
    fn the_lab_zone_knows_aws_and_its_machines() {
        use crate::imds::MachineMetadata;
        let machines: Machines = Default::default();
        let address = Ipv4Addr::new(172, 31, 0, 4);
        machines.write().unwrap().insert(
            address,
            MachineMetadata {
                instance_id: "i-0123456789abcdef0".to_owned(),
                address,
                ami_id: String::new(),
                instance_type: String::new(),
                availability_zone: String::new(),
                region: "us-east-1".to_owned(),
                local_hostname: "ip-172-31-0-4.ec2.internal".to_owned(),
                mac: String::new(),
                key_name: None,
                public_key: None,
                user_data: None,
                profile: None,
                credentials: None,
            },
        );
        let front = Ipv4Addr::new(172, 31, 0, 3);
        let zone = LabZone { front, machines };
        for name in [
            "amazonaws.com",
            "ssm.us-east-1.amazonaws.com",
            "bucket.s3.us-east-1.amazonaws.com",
            "deb.debian.org",
            "security.debian.org",
        ] {
            assert_eq!(zone.lookup(name), Lookup::Address(front), "{name}");
        }
        assert_eq!(
            zone.lookup("ip-172-31-0-4.ec2.internal"),
            Lookup::Address(address)
        );
        for name in [
            "ip-172-31-0-5.ec2.internal",
            "amazonaws.com.example.org",
            "notamazonaws.com",
            "debian.org",
            "ftp.debian.org",
            "pypi.org",
        ] {
            assert_eq!(zone.lookup(name), Lookup::NoSuchName, "{name}");
        }
    }

    #[tokio::test]
    async fn queries_over_udp_and_tcp() {
        let zone: Arc<dyn Zone> = Arc::new(TestZone);
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let udp_address = udp.local_addr().unwrap();
        tokio::spawn(serve_udp(udp, Arc::clone(&zone)));
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp_address = tcp.local_addr().unwrap();
        tokio::spawn(serve_tcp(tcp, zone));

        let client = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client
            .send_to(
                &query(9, "ssm.us-east-1.amazonaws.com", TYPE_A),
                udp_address,
            )
            .await
            .unwrap();
        let mut buffer = [0u8; 512];
        let (length, _) = client.recv_from(&mut buffer).await.unwrap();
        assert_eq!(answer_count(&buffer[..length]), 1);

        let mut stream = tokio::net::TcpStream::connect(tcp_address).await.unwrap();
        for id in [10u16, 11] {
            let asked = query(id, "example.com", TYPE_A);
            let mut framed = (asked.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&asked);
            stream.write_all(&framed).await.unwrap();
            let mut length = [0u8; 2];
            stream.read_exact(&mut length).await.unwrap();
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
            stream.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer[..2], &id.to_be_bytes());
            assert_eq!(rcode(&answer), RCODE_NAME_ERROR);
        }
    }
}
