//! The lab's front to the emulator: every client of the lab's AWS API goes through it, rigger
//! on this machine and the AWS CLI inside machines alike.
//!
//! - Inside the lab it answers HTTPS on port 443 of the front's address in the VPC
//!   ([`crate::net::Vpc::front`]: reserved in its subnet, so no machine has it), where the
//!   lab's resolver ([`crate::dns`]) sends every `*.amazonaws.com` name, with a certificate of
//!   the lab's CA ([`crate::pki`]) that machines trust: Debian 12's AWS CLI ignores every
//!   endpoint variable, so rigger's boot scripts call the real host names, unchanged.
//! - On this machine it answers plain HTTP on 127.0.0.1: the lab's `endpoint`, what
//!   `--endpoint-url` takes.
//!
//! Both forward every request to the emulator (moto, on a loopback port of its own) with its
//! `Host` header kept: moto picks the service by the request's credential scope and host, and
//! S3's bucket from a virtual-hosted name. Bodies are streamed both ways (S3 objects of any
//! size), chunked request bodies are passed on with a length, responses keep their framing
//! (length, chunked, or until close), `HEAD` answers keep their `Content-Length` and carry no
//! body, and `Expect: 100-continue` is answered by the front itself.
//!
//! Parts of the lab answer some calls themselves (the emulator's answers are static where the
//! lab knows better, e.g. a load balancer's health): an [`Edge`] sees each call ([`EmulatorCall`]:
//! the service, the action, the parameters) with the emulator's status and body, and may
//! replace the body. The runner registers edges in an [`Edges`] registry the front reads. Only
//! calls naming an action (the query and JSON protocols, not S3's REST calls) are offered to
//! edges, and their answers are buffered only while an edge is registered.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

/// One call to the emulator as the front saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmulatorCall {
    /// The SigV4 credential scope's service, e.g. "elasticloadbalancing".
    pub service: String,
    /// Action= from query or form body, or the X-Amz-Target operation.
    pub action: String,
    /// Query + form parameters.
    pub params: Vec<(String, String)>,
}

impl EmulatorCall {
    /// The first value of parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Lets a part of the lab answer some calls itself (the emulator's answers are static where
/// the lab knows better).
pub trait Edge: Send + Sync {
    fn rewrite(&self, call: &EmulatorCall, status: u16, body: &[u8]) -> Option<Vec<u8>>;
}

/// The edges the front consults, in registration order; the runner adds them (also while the
/// front runs).
#[derive(Clone, Default)]
pub struct Edges {
    edges: Arc<RwLock<Vec<Arc<dyn Edge>>>>,
}

impl Edges {
    pub fn new() -> Edges {
        Edges::default()
    }

    /// Adds `edge`: from now on it sees every call.
    pub fn register(&self, edge: Arc<dyn Edge>) {
        self.edges.write().expect("edges lock").push(edge);
    }

    /// Whether any edge is registered (the front buffers answers only then).
    pub fn is_empty(&self) -> bool {
        self.edges.read().expect("edges lock").is_empty()
    }

    /// The body the lab answers `call` with: the first edge's rewrite, or `None` (the
    /// emulator's body stands).
    pub fn rewrite(&self, call: &EmulatorCall, status: u16, body: &[u8]) -> Option<Vec<u8>> {
        let edges = self.edges.read().expect("edges lock").clone();
        edges
            .iter()
            .find_map(|edge| edge.rewrite(call, status, body))
    }
}

/// A request head larger than this is refused.
const MAX_HEAD: usize = 64 * 1024;
/// At most this many header fields.
const MAX_HEADERS: usize = 128;
/// Request bodies up to this size are read whole before forwarding (form parameters for the
/// edges; a retry on a fresh connection to the emulator is possible); larger ones stream.
const SMALL_BODY: u64 = 1024 * 1024;
/// The most the front holds in memory for one message: a chunked request body (passed on with
/// a length), an answer an edge inspects.
const MAX_BUFFERED: u64 = 64 * 1024 * 1024;
/// How long a kept-alive client connection may wait for its next request.
const CLIENT_IDLE: Duration = Duration::from_secs(120);
/// How long any one read or write of a message in flight may take.
const IO_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the emulator may take to start answering.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const COPY_BUFFER: usize = 64 * 1024;

/// Header fields that describe one connection, not the message: never forwarded (RFC 9110
/// 7.6.1), besides those a `Connection` field names. The framing fields (`Content-Length`,
/// `Transfer-Encoding`) are set by the front for each side; `Expect` is answered by it.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
];

/// The names of Debian's archive the lab's package mirror answers for (the lab's resolver
/// sends them to the front's address): Debian's own, and the one Debian's EC2 AMIs list.
pub const ARCHIVE_NAMES: &[&str] = &[
    "deb.debian.org",
    "security.debian.org",
    "cdn-aws.deb.debian.org",
];

/// The archive's trees the mirror serves (the packages and the security updates).
const ARCHIVE_TREES: &[&str] = &["/debian/", "/debian-security/"];

/// The port Debian's archive answers plain HTTP on (apt checks signatures, not TLS).
pub const ARCHIVE_PORT: u16 = 80;

/// Where a front forwards, and what it lets through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upstream {
    /// The emulator, on a loopback port: every request, its `Host` kept.
    Emulator(SocketAddr),
    /// Debian's package archive at `host` (port 80), for machines (the lab's package mirror):
    /// only `GET` and `HEAD` of the archive's trees, asked of one of [`ARCHIVE_NAMES`], sent on
    /// with `host` as `Host`. Nothing else of this machine's network is reachable through it.
    DebianArchive { host: String },
}

impl Upstream {
    /// What the client is told failed.
    fn describe(&self) -> String {
        match self {
            Upstream::Emulator(address) => format!("the lab's emulator at {address}"),
            Upstream::DebianArchive { host } => format!("Debian's archive at {host}"),
        }
    }

    /// What to do about it.
    fn hint(&self) -> &'static str {
        match self {
            Upstream::Emulator(_) => "is the lab up? (`rigger lab status`)",
            Upstream::DebianArchive { .. } => {
                "can this machine reach Debian's archive? (`apt-get update` here)"
            }
        }
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        let connecting = async {
            match self {
                Upstream::Emulator(address) => TcpStream::connect(address).await,
                Upstream::DebianArchive { host } => {
                    TcpStream::connect((host.as_str(), ARCHIVE_PORT)).await
                }
            }
        };
        tokio::time::timeout(IO_TIMEOUT, connecting)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }

    /// The request as it goes on, or why it may not.
    fn admit(&self, mut request: RequestHead) -> Result<RequestHead, Failure> {
        let Upstream::DebianArchive { host } = self else {
            return Ok(request);
        };
        let refuse = |status: u16, why: &str| {
            Failure::Refused(
                status,
                format!("the lab's package mirror serves Debian's archive only: {why}"),
            )
        };
        if request.method != "GET" && request.method != "HEAD" {
            return Err(refuse(405, "GET and HEAD only"));
        }
        let asked = request
            .header("host")
            .and_then(|value| std::str::from_utf8(value).ok())
            .map(|value| value.trim().to_ascii_lowercase())
            .unwrap_or_default();
        let asked = asked.strip_suffix(":80").unwrap_or(&asked);
        if !ARCHIVE_NAMES.contains(&asked) {
            return Err(refuse(403, &format!("not for the host {asked:?}")));
        }
        if !archive_path(&request.target) {
            return Err(refuse(
                403,
                "the path is not a plain path under /debian/ or /debian-security/",
            ));
        }
        if request_framing(&request.headers)? != Framing::None {
            return Err(refuse(400, "a request to the archive has no body"));
        }
        request
            .headers
            .retain(|(name, _)| !name.eq_ignore_ascii_case("host"));
        request
            .headers
            .push(("Host".to_owned(), host.as_bytes().to_vec()));
        Ok(request)
    }
}

/// Whether `target` is a plain path in one of the archive's trees: no query, no `.` or `..`
/// segment, no empty segment, only the characters file names in the archive use.
fn archive_path(target: &str) -> bool {
    ARCHIVE_TREES.iter().any(|tree| target.starts_with(tree))
        && target.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'.' | b'_' | b'~' | b'+' | b'%')
        })
        && !target.contains("//")
        && !target
            .split('/')
            .any(|segment| segment == "." || segment == "..")
}

/// The front: where it forwards, and the edges it consults.
pub struct Front {
    upstream: Upstream,
    edges: Edges,
}

impl Front {
    /// A front to the emulator at `emulator`, consulting `edges`.
    pub fn new(emulator: SocketAddr, edges: Edges) -> Arc<Front> {
        Arc::new(Front {
            upstream: Upstream::Emulator(emulator),
            edges,
        })
    }

    /// The lab's package mirror: a front to Debian's archive at `host`.
    pub fn debian_archive(host: &str) -> Arc<Front> {
        Arc::new(Front {
            upstream: Upstream::DebianArchive {
                host: host.to_owned(),
            },
            edges: Edges::new(),
        })
    }

    /// Serves plain HTTP on `listener` until the runner exits.
    pub async fn serve_plain(self: Arc<Self>, listener: TcpListener) {
        loop {
            let Some(stream) = accept(&listener).await else {
                continue;
            };
            let front = Arc::clone(&self);
            tokio::spawn(async move { front.connection(stream).await });
        }
    }

    /// Serves HTTPS on `listener` with `tls` until the runner exits.
    pub async fn serve_tls(self: Arc<Self>, listener: TcpListener, tls: Arc<rustls::ServerConfig>) {
        let acceptor = tokio_rustls::TlsAcceptor::from(tls);
        loop {
            let Some(stream) = accept(&listener).await else {
                continue;
            };
            let front = Arc::clone(&self);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => front.connection(stream).await,
                    Ok(Err(error)) => tracing::debug!(%error, "front: TLS handshake"),
                    Err(_) => tracing::debug!("front: TLS handshake timed out"),
                }
            });
        }
    }

    /// One client connection: requests until the client closes, asks to, or stalls.
    async fn connection<S: AsyncRead + AsyncWrite + Unpin>(&self, stream: S) {
        let mut client = Conn::new(stream);
        let mut server: Option<Conn<TcpStream>> = None;
        loop {
            let head = match tokio::time::timeout(CLIENT_IDLE, client.request_head()).await {
                Ok(Ok(Some(head))) => head,
                Ok(Ok(None)) | Err(_) => return,
                Ok(Err(Failure::Io(error))) => {
                    tracing::debug!(%error, "front: reading a request");
                    return;
                }
                Ok(Err(Failure::Refused(status, message))) => {
                    client.refuse(status, &message).await;
                    return;
                }
            };
            match self.exchange(&mut client, &mut server, head).await {
                Ok(true) => {}
                Ok(false) => {
                    let _ = client.stream.shutdown().await;
                    return;
                }
                Err(Failure::Refused(status, message)) => {
                    client.refuse(status, &message).await;
                    return;
                }
                Err(Failure::Io(error)) => {
                    tracing::debug!(%error, "front: forwarding");
                    return;
                }
            }
        }
    }

    /// Forwards one request and its answer; returns whether the client connection stays open.
    async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        client: &mut Conn<S>,
        server: &mut Option<Conn<TcpStream>>,
        request: RequestHead,
    ) -> Result<bool, Failure> {
        let request = self.upstream.admit(request)?;
        let framing = request_framing(&request.headers)?;
        let expects_continue = request
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
        if expects_continue && framing != Framing::None && framing != Framing::Length(0) {
            client
                .write(b"HTTP/1.1 100 Continue\r\n\r\n")
                .await
                .map_err(Failure::Io)?;
            client.flush().await.map_err(Failure::Io)?;
        }
        // The body: read whole when small (or chunked), else streamed below.
        let body = match framing {
            Framing::None => Some(Vec::new()),
            Framing::Length(length) if length <= SMALL_BODY => {
                Some(client.read_exact_vec(length as usize).await?)
            }
            Framing::Length(_) => None,
            Framing::Chunked => Some(client.read_chunked(MAX_BUFFERED).await?),
            Framing::UntilClose => unreachable!("requests have no such framing"),
        };
        let call = emulator_call(&request.target, &request.headers, body.as_deref());
        let body_length = match (&body, framing) {
            (Some(body), _) => body.len() as u64,
            (None, Framing::Length(length)) => length,
            (None, _) => unreachable!("only a long body is streamed"),
        };
        let forwarded = forwarded_head(&request, body_length, framing != Framing::None);

        // A kept-alive connection to the server may have been closed by it meanwhile: a
        // request whose body the front holds is sent again once on a fresh one.
        let mut attempts = 0;
        let response = loop {
            attempts += 1;
            let reused = server.is_some();
            let connection = match server {
                Some(connection) => connection,
                None => {
                    let stream = self.upstream.connect().await.map_err(|error| {
                        Failure::Refused(
                            502,
                            format!(
                                "{} does not answer ({error}): {}",
                                self.upstream.describe(),
                                self.upstream.hint()
                            ),
                        )
                    })?;
                    let _ = stream.set_nodelay(true);
                    server.insert(Conn::new(stream))
                }
            };
            let sent = async {
                connection.write(&forwarded).await?;
                match &body {
                    Some(body) => connection.write(body).await?,
                    None => {
                        client
                            .copy_exact(body_length, &mut connection.stream)
                            .await?
                    }
                }
                connection.flush().await
            }
            .await;
            let answered = match sent {
                Ok(()) => {
                    match tokio::time::timeout(UPSTREAM_TIMEOUT, connection.response_head()).await {
                        Ok(result) => result,
                        Err(_) => {
                            *server = None;
                            return Err(Failure::Refused(
                                504,
                                format!(
                                    "{} did not answer within {} s",
                                    self.upstream.describe(),
                                    UPSTREAM_TIMEOUT.as_secs()
                                ),
                            ));
                        }
                    }
                }
                Err(error) => Err(Failure::Io(error)),
            };
            match answered {
                Ok(Some(head)) => break head,
                Ok(None) | Err(Failure::Io(_)) if reused && body.is_some() && attempts == 1 => {
                    *server = None;
                }
                Ok(None) => {
                    *server = None;
                    return Err(Failure::Refused(
                        502,
                        format!(
                            "{} closed the connection without answering",
                            self.upstream.describe()
                        ),
                    ));
                }
                Err(Failure::Io(error)) => {
                    *server = None;
                    return Err(Failure::Refused(
                        502,
                        format!("talking to {} failed: {error}", self.upstream.describe()),
                    ));
                }
                Err(refused) => {
                    *server = None;
                    return Err(refused);
                }
            }
        };
        let connection = server.as_mut().expect("connected above");

        let response_framing = response_framing(&request.method, &response)?;
        let server_keeps_alive = response_framing != Framing::UntilClose
            && !response.connection_has(b"close")
            && (response.minor_version == 1 || response.connection_has(b"keep-alive"));
        let client_keeps_alive = request.minor_version == 1 && !request.connection_has(b"close");
        let http11_client = request.minor_version == 1;

        let inspect = !call.action.is_empty()
            && !self.edges.is_empty()
            && match response_framing {
                Framing::Length(length) => length <= MAX_BUFFERED,
                Framing::Chunked | Framing::UntilClose => true,
                Framing::None => false,
            };
        let keep_alive = if inspect {
            let read = match response_framing {
                Framing::Length(length) => connection
                    .read_exact_vec(length as usize)
                    .await
                    .map_err(Failure::Io),
                Framing::Chunked => connection.read_chunked(MAX_BUFFERED).await,
                Framing::UntilClose => connection.read_to_end(MAX_BUFFERED).await,
                Framing::None => unreachable!("not inspected"),
            };
            let mut answer = read.map_err(|failure| {
                *server = None;
                from_upstream(failure)
            })?;
            if let Some(rewritten) = self.edges.rewrite(&call, response.status, &answer) {
                answer = rewritten;
            }
            let head = response_head(
                &response,
                ResponseBody::Length(answer.len() as u64),
                client_keeps_alive,
            );
            client.write(&head).await.map_err(Failure::Io)?;
            client.write(&answer).await.map_err(Failure::Io)?;
            client_keeps_alive
        } else {
            let (body, keep_alive) = match response_framing {
                Framing::None => (ResponseBody::Kept, client_keeps_alive),
                Framing::Length(length) => (ResponseBody::Length(length), client_keeps_alive),
                Framing::Chunked if http11_client => (ResponseBody::Chunked, client_keeps_alive),
                Framing::Chunked | Framing::UntilClose => (ResponseBody::UntilClose, false),
            };
            let head = response_head(&response, body, keep_alive);
            client.write(&head).await.map_err(Failure::Io)?;
            // Once the head is out, a failure can only end the connection.
            let copied = match response_framing {
                Framing::None => Ok(()),
                Framing::Length(length) => connection
                    .copy_exact(length, &mut client.stream)
                    .await
                    .map_err(Failure::Io),
                Framing::Chunked if http11_client => {
                    connection.relay_chunked(&mut client.stream).await
                }
                Framing::Chunked => connection.dechunk_to(&mut client.stream).await,
                Framing::UntilClose => connection
                    .copy_to_end(&mut client.stream)
                    .await
                    .map_err(Failure::Io),
            };
            if let Err(failure) = copied {
                *server = None;
                return Err(Failure::Io(match failure {
                    Failure::Io(error) => error,
                    Failure::Refused(_, message) => std::io::Error::other(message),
                }));
            }
            keep_alive
        };
        client.flush().await.map_err(Failure::Io)?;
        if !server_keeps_alive {
            *server = None;
        }
        Ok(keep_alive)
    }
}

async fn accept(listener: &TcpListener) -> Option<TcpStream> {
    match listener.accept().await {
        Ok((stream, _)) => {
            let _ = stream.set_nodelay(true);
            Some(stream)
        }
        Err(error) => {
            tracing::warn!(%error, "front: accepting");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

/// Why an exchange ended early.
#[derive(Debug)]
enum Failure {
    /// The connection broke or stalled: nothing more can be said on it.
    Io(std::io::Error),
    /// The client gets this status and message, then the connection closes.
    Refused(u16, String),
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Failure {
        Failure::Io(error)
    }
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// How the front delimits a body it forwards to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseBody {
    /// No body; the emulator's `Content-Length` (of what a `GET` would give) is kept.
    Kept,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A request's head, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RequestHead {
    method: String,
    target: String,
    minor_version: u8,
    headers: Vec<(String, Vec<u8>)>,
}

/// A response's head, as parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ResponseHead {
    status: u16,
    reason: String,
    minor_version: u8,
    headers: Vec<(String, Vec<u8>)>,
}

trait Headers {
    fn headers(&self) -> &[(String, Vec<u8>)];

    fn header(&self, name: &str) -> Option<&[u8]> {
        header(self.headers(), name)
    }

    /// Whether a `Connection` field lists `token`.
    fn connection_has(&self, token: &[u8]) -> bool {
        connection_tokens(self.headers())
            .iter()
            .any(|t| t.eq_ignore_ascii_case(token))
    }
}

impl Headers for RequestHead {
    fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }
}

impl Headers for ResponseHead {
    fn headers(&self) -> &[(String, Vec<u8>)] {
        &self.headers
    }
}

fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// The comma-separated tokens of every field `name`, in order, lower-cased.
fn field_tokens(headers: &[(String, Vec<u8>)], name: &str) -> Vec<Vec<u8>> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .flat_map(|(_, v)| v.split(|b| *b == b','))
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

fn connection_tokens(headers: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    field_tokens(headers, "connection")
}

/// Whether field `name` travels on: not hop-by-hop, not named by a `Connection` field.
fn forwarded_field(name: &str, connection: &[Vec<u8>]) -> bool {
    let lower = name.to_ascii_lowercase();
    !HOP_BY_HOP.contains(&lower.as_str()) && !connection.iter().any(|t| t == lower.as_bytes())
}

/// The body framing of a request (RFC 9112 6.3): chunked when `Transfer-Encoding` ends with
/// it (any other transfer coding cannot be delimited: refused), else `Content-Length`, else
/// none.
fn request_framing(headers: &[(String, Vec<u8>)]) -> Result<Framing, Failure> {
    let refuse = |message: &str| Failure::Refused(400, message.to_owned());
    let codings = transfer_codings(headers);
    if let Some(last) = codings.last() {
        if last.as_slice() != b"chunked" {
            return Err(refuse(
                "a request body must be chunked last when it has a transfer coding",
            ));
        }
        return Ok(Framing::Chunked);
    }
    match content_length(headers) {
        Ok(Some(length)) => Ok(Framing::Length(length)),
        Ok(None) => Ok(Framing::None),
        Err(()) => Err(refuse("the request's Content-Length is not one number")),
    }
}

/// The body framing of the emulator's answer to a `method` request.
fn response_framing(method: &str, response: &ResponseHead) -> Result<Framing, Failure> {
    if method.eq_ignore_ascii_case("HEAD")
        || (100..200).contains(&response.status)
        || response.status == 204
        || response.status == 304
    {
        return Ok(Framing::None);
    }
    let chunked = transfer_codings(&response.headers).pop();
    if let Some(last) = chunked {
        return Ok(if last.as_slice() == b"chunked" {
            Framing::Chunked
        } else {
            Framing::UntilClose
        });
    }
    match content_length(&response.headers) {
        Ok(Some(length)) => Ok(Framing::Length(length)),
        Ok(None) => Ok(Framing::UntilClose),
        Err(()) => Err(Failure::Refused(
            502,
            "the server behind the front answered with an unreadable Content-Length".to_owned(),
        )),
    }
}

/// The transfer codings of a message, in order, lower-cased.
fn transfer_codings(headers: &[(String, Vec<u8>)]) -> Vec<Vec<u8>> {
    field_tokens(headers, "transfer-encoding")
}

/// The one `Content-Length` of `headers` (repeats must agree).
fn content_length(headers: &[(String, Vec<u8>)]) -> Result<Option<u64>, ()> {
    let mut found: Option<u64> = None;
    for (_, value) in headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        for part in value.split(|b| *b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) || part.len() > 18 {
                return Err(());
            }
            let length: u64 = std::str::from_utf8(part)
                .map_err(drop)?
                .parse()
                .map_err(drop)?;
            if found.is_some_and(|f| f != length) {
                return Err(());
            }
            found = Some(length);
        }
    }
    Ok(found)
}

/// The head the emulator gets: the client's request line and fields (`Host` kept), minus
/// what describes the client's connection, with the body's length.
fn forwarded_head(request: &RequestHead, body_length: u64, has_body: bool) -> Vec<u8> {
    let connection = connection_tokens(&request.headers);
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(request.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(request.target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &request.headers {
        if forwarded_field(name, &connection) {
            push_field(&mut out, name, value);
        }
    }
    if has_body {
        push_field(
            &mut out,
            "Content-Length",
            body_length.to_string().as_bytes(),
        );
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// The head the client gets: the emulator's status and fields, framed by the front.
fn response_head(response: &ResponseHead, body: ResponseBody, keep_alive: bool) -> Vec<u8> {
    let connection = connection_tokens(&response.headers);
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(
        format!("HTTP/1.1 {} {}\r\n", response.status, response.reason).as_bytes(),
    );
    for (name, value) in &response.headers {
        let kept_length = body == ResponseBody::Kept && name.eq_ignore_ascii_case("content-length");
        if kept_length || forwarded_field(name, &connection) {
            push_field(&mut out, name, value);
        }
    }
    match body {
        ResponseBody::Kept | ResponseBody::UntilClose => {}
        ResponseBody::Length(length) => {
            push_field(&mut out, "Content-Length", length.to_string().as_bytes());
        }
        ResponseBody::Chunked => push_field(&mut out, "Transfer-Encoding", b"chunked"),
    }
    if !keep_alive {
        push_field(&mut out, "Connection", b"close");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// The call a request makes, for the edges: the service from the SigV4 credential scope (the
/// `Authorization` field, or a presigned URL's `X-Amz-Credential`), the action from
/// `Action=` (query or form body) or `X-Amz-Target`, the query's and the form's parameters.
fn emulator_call(target: &str, headers: &[(String, Vec<u8>)], body: Option<&[u8]>) -> EmulatorCall {
    let mut params = match target.split_once('?') {
        Some((_, query)) => form_pairs(query.as_bytes()),
        None => Vec::new(),
    };
    let is_form = header(headers, "content-type").is_some_and(|v| {
        v.len() >= 33 && v[..33].eq_ignore_ascii_case(b"application/x-www-form-urlencoded")
    });
    if let (true, Some(body)) = (is_form, body) {
        params.extend(form_pairs(body));
    }
    let credential = header(headers, "authorization")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.split_once("Credential=").map(|(_, rest)| rest))
        .map(|rest| rest.split([',', ' ']).next().unwrap_or_default().to_owned())
        .or_else(|| {
            params
                .iter()
                .find(|(k, _)| k == "X-Amz-Credential")
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_default();
    let service = credential.split('/').nth(3).unwrap_or_default().to_owned();
    let action = params
        .iter()
        .find(|(k, _)| k == "Action")
        .map(|(_, v)| v.clone())
        .or_else(|| {
            header(headers, "x-amz-target")
                .and_then(|v| std::str::from_utf8(v).ok())
                .map(|v| v.rsplit('.').next().unwrap_or(v).to_owned())
        })
        .unwrap_or_default();
    EmulatorCall {
        service,
        action,
        params,
    }
}

/// `a=b&c=d` pairs, percent-decoded (`+` is a space).
fn form_pairs(text: &[u8]) -> Vec<(String, String)> {
    text.split(|b| *b == b'&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = match pair.iter().position(|b| *b == b'=') {
                Some(at) => (&pair[..at], &pair[at + 1..]),
                None => (pair, &b""[..]),
            };
            (percent_decode(key), percent_decode(value))
        })
        .collect()
}

fn percent_decode(text: &[u8]) -> String {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match text[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < text.len() => match (hex(text[i + 1]), hex(text[i + 2])) {
                (Some(high), Some(low)) => {
                    out.push((high * 16 + low) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            other => out.push(other),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One side of a forwarded exchange: the stream and what was read from it but not used yet.
struct Conn<S> {
    stream: S,
    buffer: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S) -> Conn<S> {
        Conn {
            stream,
            buffer: Vec::with_capacity(8 * 1024),
        }
    }

    /// Reads more into the buffer; `false` at the end of the stream.
    async fn fill(&mut self) -> std::io::Result<bool> {
        self.buffer.reserve(COPY_BUFFER);
        let read = tokio::time::timeout(IO_TIMEOUT, self.stream.read_buf(&mut self.buffer))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        Ok(read > 0)
    }

    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        write_all(&mut self.stream, bytes).await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        tokio::time::timeout(IO_TIMEOUT, self.stream.flush())
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    }

    /// The next request's head; `None` when the client closed between requests.
    async fn request_head(&mut self) -> Result<Option<RequestHead>, Failure> {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Request::new(&mut fields);
            match parsed.parse(&self.buffer) {
                Ok(httparse::Status::Complete(length)) => {
                    let head = RequestHead {
                        method: parsed.method.unwrap_or_default().to_owned(),
                        target: parsed.path.unwrap_or_default().to_owned(),
                        minor_version: parsed.version.unwrap_or(1),
                        headers: owned_fields(parsed.headers),
                    };
                    self.buffer.drain(..length);
                    return Ok(Some(head));
                }
                Ok(httparse::Status::Partial) if self.buffer.len() > MAX_HEAD => {
                    return Err(Failure::Refused(
                        431,
                        "the request head is too large".to_owned(),
                    ));
                }
                Ok(httparse::Status::Partial) => {}
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(Failure::Refused(
                        431,
                        "the request has too many fields".to_owned(),
                    ));
                }
                Err(error) => {
                    return Err(Failure::Refused(
                        400,
                        format!("not an HTTP request: {error}"),
                    ));
                }
            }
            if !self.fill().await? {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(Failure::Io(std::io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }

    /// The emulator's next answer's head; `None` when it closed before answering.
    async fn response_head(&mut self) -> Result<Option<ResponseHead>, Failure> {
        loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut fields);
            match parsed.parse(&self.buffer) {
                Ok(httparse::Status::Complete(length)) => {
                    let head = ResponseHead {
                        status: parsed.code.unwrap_or(502),
                        reason: parsed.reason.unwrap_or_default().to_owned(),
                        minor_version: parsed.version.unwrap_or(1),
                        headers: owned_fields(parsed.headers),
                    };
                    self.buffer.drain(..length);
                    // Interim answers (the front sends no `Expect`, so none is awaited).
                    if (100..200).contains(&head.status) && head.status != 101 {
                        continue;
                    }
                    return Ok(Some(head));
                }
                Ok(httparse::Status::Partial) if self.buffer.len() <= MAX_HEAD => {}
                Ok(httparse::Status::Partial) | Err(_) => {
                    return Err(Failure::Refused(
                        502,
                        "the server behind the front answered something that is not HTTP"
                            .to_owned(),
                    ));
                }
            }
            if !self.fill().await? {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(Failure::Io(std::io::ErrorKind::UnexpectedEof.into()))
                };
            }
        }
    }

    /// Reads exactly `length` bytes of body.
    async fn read_exact_vec(&mut self, length: usize) -> std::io::Result<Vec<u8>> {
        while self.buffer.len() < length {
            if !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(self.buffer.drain(..length).collect())
    }

    /// Reads until the end of the stream, at most `limit` bytes.
    async fn read_to_end(&mut self, limit: u64) -> Result<Vec<u8>, Failure> {
        while self.fill().await? {
            if self.buffer.len() as u64 > limit {
                return Err(too_large(limit));
            }
        }
        Ok(std::mem::take(&mut self.buffer))
    }

    /// One line (a chunk's size, a trailer field), without its line end.
    async fn read_line(&mut self) -> Result<Vec<u8>, Failure> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let mut line: Vec<u8> = self.buffer.drain(..=end).collect();
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(line);
            }
            if self.buffer.len() > 4096 {
                return Err(Failure::Refused(400, "a chunk line is too long".to_owned()));
            }
            if !self.fill().await? {
                return Err(Failure::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// The next chunk's size (0: the last; its trailer fields are read and dropped).
    async fn chunk_size(&mut self) -> Result<u64, Failure> {
        let line = self.read_line().await?;
        let digits = line
            .split(|b| *b == b';')
            .next()
            .unwrap_or_default()
            .trim_ascii();
        let size = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.len() <= 15)
            .and_then(|d| u64::from_str_radix(d, 16).ok())
            .ok_or_else(|| Failure::Refused(400, "a chunk's size is not hexadecimal".to_owned()))?;
        if size == 0 {
            while !self.read_line().await?.is_empty() {}
        }
        Ok(size)
    }

    /// The line end after a chunk's data.
    async fn chunk_end(&mut self) -> Result<(), Failure> {
        if self.read_line().await?.is_empty() {
            Ok(())
        } else {
            Err(Failure::Refused(
                400,
                "a chunk is longer than its size".to_owned(),
            ))
        }
    }

    /// A chunked body, decoded, at most `limit` bytes.
    async fn read_chunked(&mut self, limit: u64) -> Result<Vec<u8>, Failure> {
        let mut body = Vec::new();
        loop {
            let size = self.chunk_size().await?;
            if size == 0 {
                return Ok(body);
            }
            if body.len() as u64 + size > limit {
                return Err(too_large(limit));
            }
            body.extend(self.read_exact_vec(size as usize).await?);
            self.chunk_end().await?;
        }
    }

    /// Copies exactly `length` bytes of body to `out`.
    async fn copy_exact<W: AsyncWrite + Unpin>(
        &mut self,
        mut length: u64,
        out: &mut W,
    ) -> std::io::Result<()> {
        while length > 0 {
            if self.buffer.is_empty() && !self.fill().await? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let take = (self.buffer.len() as u64).min(length) as usize;
            write_all(out, &self.buffer[..take]).await?;
            self.buffer.drain(..take);
            length -= take as u64;
        }
        Ok(())
    }

    /// Copies a chunked body to `out` as it comes, chunk by chunk (trailers dropped).
    async fn relay_chunked<W: AsyncWrite + Unpin>(&mut self, out: &mut W) -> Result<(), Failure> {
        loop {
            let size = self.chunk_size().await?;
            write_all(out, format!("{size:x}\r\n").as_bytes()).await?;
            if size == 0 {
                write_all(out, b"\r\n").await?;
                return Ok(());
            }
            self.copy_exact(size, out).await?;
            self.chunk_end().await?;
            write_all(out, b"\r\n").await?;
        }
    }

    /// Copies a chunked body's data to `out` (for an HTTP/1.0 client, which the front then
    /// closes).
    async fn dechunk_to<W: AsyncWrite + Unpin>(&mut self, out: &mut W) -> Result<(), Failure> {
        loop {
            let size = self.chunk_size().await?;
            if size == 0 {
                return Ok(());
            }
            self.copy_exact(size, out).await?;
            self.chunk_end().await?;
        }
    }

    /// Copies everything until the end of the stream to `out`.
    async fn copy_to_end<W: AsyncWrite + Unpin>(&mut self, out: &mut W) -> std::io::Result<()> {
        loop {
            if !self.buffer.is_empty() {
                write_all(out, &self.buffer).await?;
                self.buffer.clear();
            }
            if !self.fill().await? {
                return Ok(());
            }
        }
    }

    /// Answers `status` with `message` and closes, reading (a bounded amount, for a bounded
    /// time) what the client still sends, so closing does not reset the connection and lose
    /// the answer.
    async fn refuse(&mut self, status: u16, message: &str) {
        let reason = match status {
            400 => "Bad Request",
            403 => "Forbidden",
            405 => "Method Not Allowed",
            413 => "Content Too Large",
            431 => "Request Header Fields Too Large",
            502 => "Bad Gateway",
            504 => "Gateway Timeout",
            _ => "Error",
        };
        let body = format!("rigger lab front: {message}\n");
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        if self.write(head.as_bytes()).await.is_err()
            || self.write(body.as_bytes()).await.is_err()
            || self.flush().await.is_err()
        {
            return;
        }
        let _ = self.stream.shutdown().await;
        let mut drained = 0;
        let mut chunk = vec![0u8; 16 * 1024];
        while drained < 1024 * 1024 {
            match tokio::time::timeout(Duration::from_secs(1), self.stream.read(&mut chunk)).await {
                Ok(Ok(read)) if read > 0 => drained += read,
                _ => break,
            }
        }
    }
}

/// A failure reading the answer of the server behind the front, as the client hears of it.
fn from_upstream(failure: Failure) -> Failure {
    match failure {
        Failure::Io(error) => Failure::Refused(
            502,
            format!("reading the answer of the server behind the front failed: {error}"),
        ),
        Failure::Refused(_, message) => Failure::Refused(
            502,
            format!("the answer of the server behind the front: {message}"),
        ),
    }
}

fn too_large(limit: u64) -> Failure {
    Failure::Refused(
        413,
        format!(
            "the message is larger than the {} MiB the front holds in memory",
            limit / (1024 * 1024)
        ),
    )
}

fn owned_fields(fields: &[httparse::Header<'_>]) -> Vec<(String, Vec<u8>)> {
    fields
        .iter()
        .map(|f| (f.name.to_owned(), f.value.to_vec()))
        .collect()
}

async fn write_all<W: AsyncWrite + Unpin>(out: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    tokio::time::timeout(IO_TIMEOUT, out.write_all(bytes))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn calls_are_read_from_the_query_the_form_and_the_target() {
        let authorization = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261205/us-east-1/elasticloadbalancing/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc";
        let form = fields(&[
            ("Authorization", authorization),
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
        ]);
        let call = emulator_call(
            "/?Version=2012-06-01",
            &form,
            Some(b"Action=DescribeInstanceHealth&LoadBalancerName=my-lb&Instances.member.1.InstanceId=i-1&Tag=a%2Fb+c"),
        );
        assert_eq!(call.service, "elasticloadbalancing");
        assert_eq!(call.action, "DescribeInstanceHealth");
        assert_eq!(call.param("Version"), Some("2012-06-01"));
        assert_eq!(call.param("LoadBalancerName"), Some("my-lb"));
        assert_eq!(call.param("Instances.member.1.InstanceId"), Some("i-1"));
        assert_eq!(call.param("Tag"), Some("a/b c"));

        let json = fields(&[
            (
                "authorization",
                "AWS4-HMAC-SHA256 Credential=A/20261205/us-east-1/ssm/aws4_request,SignedHeaders=host,Signature=0",
            ),
            ("X-Amz-Target", "AmazonSSM.GetParameter"),
            ("Content-Type", "application/x-amz-json-1.1"),
        ]);
        let call = emulator_call("/", &json, Some(br#"{"Name":"x"}"#));
        assert_eq!(
            (call.service.as_str(), call.action.as_str()),
            ("ssm", "GetParameter")
        );
        assert!(call.params.is_empty(), "a JSON body is no form: {call:?}");

        let presigned = emulator_call(
            "/bucket/key?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=A%2F20261205%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature=0",
            &[],
            None,
        );
        assert_eq!(
            (presigned.service.as_str(), presigned.action.as_str()),
            ("s3", "")
        );

        // A form body that was streamed (too long to hold) is not read; odd escapes are kept.
        let call = emulator_call("/?a=%zz&b=%4", &form, None);
        assert_eq!(call.param("a"), Some("%zz"));
        assert_eq!(call.param("b"), Some("%4"));
        assert_eq!(call.action, "");
    }

    #[test]
    fn framing() {
        assert_eq!(request_framing(&fields(&[])).unwrap(), Framing::None);
        assert_eq!(
            request_framing(&fields(&[("Content-Length", "12")])).unwrap(),
            Framing::Length(12)
        );
        assert_eq!(
            request_framing(&fields(&[
                ("Content-Length", "12"),
                ("Transfer-Encoding", "chunked")
            ]))
            .unwrap(),
            Framing::Chunked,
            "chunked wins over a length"
        );
        for bad in [
            fields(&[("Content-Length", "12"), ("Content-Length", "13")]),
            fields(&[("Content-Length", "-1")]),
            fields(&[("Content-Length", "")]),
            fields(&[("Transfer-Encoding", "gzip")]),
        ] {
            assert!(
                matches!(request_framing(&bad), Err(Failure::Refused(400, _))),
                "{bad:?}"
            );
        }
        let response = |status: u16, pairs: &[(&str, &str)]| ResponseHead {
            status,
            reason: String::new(),
            minor_version: 1,
            headers: fields(pairs),
        };
        let length = [("Content-Length", "1000")];
        assert_eq!(
            response_framing("HEAD", &response(200, &length)).unwrap(),
            Framing::None
        );
        assert_eq!(
            response_framing("GET", &response(204, &[])).unwrap(),
            Framing::None
        );
        assert_eq!(
            response_framing("GET", &response(304, &length)).unwrap(),
            Framing::None
        );
        assert_eq!(
            response_framing("GET", &response(200, &length)).unwrap(),
            Framing::Length(1000)
        );
        assert_eq!(
            response_framing("GET", &response(200, &[("Transfer-Encoding", "chunked")])).unwrap(),
            Framing::Chunked
        );
        assert_eq!(
            response_framing("GET", &response(200, &[])).unwrap(),
            Framing::UntilClose
        );
    }

    fn archive_request(method: &str, host: &str, target: &str) -> RequestHead {
        RequestHead {
            method: method.to_owned(),
            target: target.to_owned(),
            minor_version: 1,
            headers: fields(&[("Host", host), ("User-Agent", "Debian APT-HTTP/1.3")]),
        }
    }

    #[test]
    fn the_package_mirror_lets_through_only_the_archive() {
        let mirror = Upstream::DebianArchive {
            host: "deb.debian.org".to_owned(),
        };
        for (host, target) in [
            ("deb.debian.org", "/debian/dists/bookworm/InRelease"),
            (
                "security.debian.org",
                "/debian-security/dists/bookworm-security/InRelease",
            ),
            (
                "cdn-aws.deb.debian.org:80",
                "/debian/pool/main/n/nginx/nginx_1.22.1-9+deb12u1_amd64.deb",
            ),
            (
                "DEB.debian.org",
                "/debian/dists/bookworm/main/binary-amd64/by-hash/SHA256/0a1b",
            ),
        ] {
            let admitted = mirror
                .admit(archive_request("GET", host, target))
                .unwrap_or_else(|_| panic!("{host}{target} refused"));
            assert_eq!(admitted.target, target);
            assert_eq!(
                admitted.header("host"),
                Some(&b"deb.debian.org"[..]),
                "{host}"
            );
            assert_eq!(
                admitted
                    .headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
                    .count(),
                1
            );
        }
        assert!(
            mirror
                .admit(archive_request(
                    "HEAD",
                    "deb.debian.org",
                    "/debian/dists/bookworm/Release"
                ))
                .is_ok()
        );

        let status = |method: &str, host: &str, target: &str| match mirror
            .admit(archive_request(method, host, target))
        {
            Err(Failure::Refused(status, message)) => {
                assert!(message.contains("Debian's archive only"), "{message}");
                status
            }
            _ => panic!("{method} {host}{target} let through"),
        };
        assert_eq!(status("POST", "deb.debian.org", "/debian/x"), 405);
        assert_eq!(status("CONNECT", "deb.debian.org", "example.org:443"), 405);
        assert_eq!(
            status("GET", "example.org", "/debian/dists/bookworm/InRelease"),
            403
        );
        assert_eq!(status("GET", "", "/debian/dists/bookworm/InRelease"), 403);
        assert_eq!(status("GET", "pypi.org", "/simple/django/"), 403);
        for target in [
            "/",
            "/ubuntu/dists/",
            "/debian/../etc/passwd",
            "/debian/./dists",
            "/debian//dists",
            "/debian/dists?x=1",
            "/debian/dists#x",
            "http://example.org/debian/dists",
            "/debian/dists/\\x",
        ] {
            assert_eq!(status("GET", "deb.debian.org", target), 403, "{target}");
        }
        let mut with_body = archive_request("GET", "deb.debian.org", "/debian/x");
        with_body
            .headers
            .push(("Content-Length".to_owned(), b"3".to_vec()));
        assert!(matches!(
            mirror.admit(with_body),
            Err(Failure::Refused(400, _))
        ));

        // The emulator's front lets everything through, as it came.
        let emulator = Upstream::Emulator("127.0.0.1:1".parse().unwrap());
        let request = archive_request("POST", "sts.amazonaws.com", "/");
        assert_eq!(emulator.admit(request.clone()).unwrap(), request);
    }

    #[test]
    fn hop_by_hop_fields_stay_with_their_connection() {
        let request = RequestHead {
            method: "PUT".to_owned(),
            target: "/bucket/key".to_owned(),
            minor_version: 1,
            headers: fields(&[
                ("Host", "bucket.s3.us-east-1.amazonaws.com"),
                ("Connection", "keep-alive, X-Private"),
                ("X-Private", "1"),
                ("Expect", "100-continue"),
                ("Transfer-Encoding", "chunked"),
                ("X-Amz-Content-Sha256", "UNSIGNED-PAYLOAD"),
            ]),
        };
        let head = String::from_utf8(forwarded_head(&request, 5, true)).unwrap();
        assert_eq!(
            head,
            "PUT /bucket/key HTTP/1.1\r\nHost: bucket.s3.us-east-1.amazonaws.com\r\nX-Amz-Content-Sha256: UNSIGNED-PAYLOAD\r\nContent-Length: 5\r\n\r\n"
        );
    }

    /// What the stand-in emulator was sent: each request's line and fields, and its body.
    type Seen = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

    /// A stand-in for the emulator: answers by path, records what it was sent.
    async fn fake_emulator() -> (SocketAddr, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen: Seen = Default::default();
        let record = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let record = Arc::clone(&record);
                tokio::spawn(async move {
                    let mut conn = Conn::new(stream);
                    while let Ok(Some(head)) = conn.request_head().await {
                        let length = match request_framing(&head.headers).unwrap() {
                            Framing::Length(length) => length as usize,
                            Framing::None => 0,
                            other => {
                                panic!("the front forwards bodies with a length, not {other:?}")
                            }
                        };
                        let body = conn.read_exact_vec(length).await.unwrap();
                        let mut shown = format!("{} {}", head.method, head.target);
                        for (name, value) in &head.headers {
                            shown.push_str(&format!(
                                "\n{}: {}",
                                name.to_ascii_lowercase(),
                                String::from_utf8_lossy(value)
                            ));
                        }
                        record.lock().unwrap().push((shown, body.clone()));
                        let path = head.target.split('?').next().unwrap().to_owned();
                        let answer: Vec<u8> = match (head.method.as_str(), path.as_str()) {
                            ("HEAD", "/object") => b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nETag: \"e\"\r\n\r\n".to_vec(),
                            (_, "/chunked") => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\nX-Trailer: t\r\n\r\n".to_vec(),
                            (_, "/close") => {
                                conn.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil close").await.unwrap();
                                return;
                            }
                            (_, "/echo") => {
                                let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
                                out.extend_from_slice(&body);
                                out
                            }
                            (_, "/big") => {
                                let size: usize = head.target.split("n=").nth(1).unwrap().parse().unwrap();
                                let mut out = format!("HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n").into_bytes();
                                out.extend((0..size).map(|i| (i % 251) as u8));
                                out
                            }
                            _ => b"HTTP/1.1 200 OK\r\nContent-Type: text/xml\r\nContent-Length: 11\r\n\r\n<original/>".to_vec(),
                        };
                        conn.write(&answer).await.unwrap();
                    }
                });
            }
        });
        (address, seen)
    }

    async fn front_for(emulator: SocketAddr, edges: Edges) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(Front::new(emulator, edges).serve_plain(listener));
        address
    }

    /// Sends `request` on `client` and reads the answer: status, fields, body.
    async fn ask(
        client: &mut Conn<TcpStream>,
        request: &[u8],
        method: &str,
    ) -> (u16, Vec<(String, Vec<u8>)>, Vec<u8>) {
        client.write(request).await.unwrap();
        let head = client.response_head().await.unwrap().unwrap();
        let body = match response_framing(method, &head).unwrap() {
            Framing::None => Vec::new(),
            Framing::Length(length) => client.read_exact_vec(length as usize).await.unwrap(),
            Framing::Chunked => client.read_chunked(u64::MAX).await.unwrap(),
            Framing::UntilClose => client.read_to_end(u64::MAX).await.unwrap(),
        };
        (head.status, head.headers, body)
    }

    #[tokio::test]
    async fn requests_and_answers_pass_through_whatever_their_framing() {
        let (emulator, seen) = fake_emulator().await;
        let front = front_for(emulator, Edges::new()).await;
        let mut client = Conn::new(TcpStream::connect(front).await.unwrap());

        // HEAD keeps the length of what GET would give, and sends no body: the next request
        // on the same connection is read right.
        let (status, fields, body) = ask(
            &mut client,
            b"HEAD /object HTTP/1.1\r\nHost: b.s3.us-east-1.amazonaws.com\r\n\r\n",
            "HEAD",
        )
        .await;
        assert_eq!((status, body.len()), (200, 0));
        assert_eq!(header(&fields, "content-length"), Some(&b"1000"[..]));
        assert_eq!(header(&fields, "etag"), Some(&b"\"e\""[..]));

        let (_, fields, body) = ask(
            &mut client,
            b"GET /chunked HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET",
        )
        .await;
        assert_eq!(body, b"hello");
        assert_eq!(header(&fields, "transfer-encoding"), Some(&b"chunked"[..]));

        // A chunked request body reaches the emulator with a length; Expect is answered here.
        client
            .write(b"PUT /echo HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .unwrap();
        let mut interim = [0u8; 25];
        client.stream.read_exact(&mut interim).await.unwrap();
        assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
        let (status, _, body) = ask(&mut client, b"4\r\nbody\r\n0\r\n\r\n", "PUT").await;
        assert_eq!((status, body.as_slice()), (200, &b"body"[..]));

        // Large bodies stream both ways.
        let large: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 7) as u8).collect();
        let mut request = format!(
            "PUT /echo HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
            large.len()
        )
        .into_bytes();
        request.extend_from_slice(&large);
        let (_, _, body) = ask(&mut client, &request, "PUT").await;
        assert!(body == large, "the large body came back intact");
        let size = 3 * 1024 * 1024 + 17;
        let (_, _, body) = ask(
            &mut client,
            format!("GET /big?n={size} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes(),
            "GET",
        )
        .await;
        assert_eq!(body.len(), size);
        assert!(body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));

        // An answer delimited by the emulator closing is passed on, and then the client's
        // connection closes too.
        let (_, fields, body) = ask(
            &mut client,
            b"GET /close HTTP/1.1\r\nHost: h\r\n\r\n",
            "GET",
        )
        .await;
        assert_eq!(body, b"until close");
        assert_eq!(header(&fields, "connection"), Some(&b"close"[..]));

        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 6, "{seen:?}");
        assert!(
            seen[0].0.contains("\nhost: b.s3.us-east-1.amazonaws.com"),
            "Host kept: {}",
            seen[0].0
        );
        assert!(
            !seen[2].0.contains("expect") && !seen[2].0.contains("transfer-encoding"),
            "{}",
            seen[2].0
        );
        assert!(seen[2].0.contains("\ncontent-length: 4"), "{}", seen[2].0);
    }

    struct Health;

    impl Edge for Health {
        fn rewrite(&self, call: &EmulatorCall, status: u16, body: &[u8]) -> Option<Vec<u8>> {
            (call.action == "DescribeInstanceHealth" && status == 200).then(|| {
                let text = String::from_utf8_lossy(body).replace("original", "lab");
                format!(
                    "{text}<lb>{}</lb>",
                    call.param("LoadBalancerName").unwrap_or("?")
                )
                .into_bytes()
            })
        }
    }

    #[tokio::test]
    async fn an_edge_answers_the_calls_it_knows_better() {
        let (emulator, _) = fake_emulator().await;
        let edges = Edges::new();
        let front = front_for(emulator, edges.clone()).await;
        let mut client = Conn::new(TcpStream::connect(front).await.unwrap());
        let form = b"Action=DescribeInstanceHealth&LoadBalancerName=web";
        let request = |form: &[u8]| {
            let mut out = format!(
                "POST / HTTP/1.1\r\nHost: elasticloadbalancing.us-east-1.amazonaws.com\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
                form.len()
            )
            .into_bytes();
            out.extend_from_slice(form);
            out
        };
        let (_, _, body) = ask(&mut client, &request(form), "POST").await;
        assert_eq!(body, b"<original/>", "no edge yet");
        edges.register(Arc::new(Health));
        let (_, fields, body) = ask(&mut client, &request(form), "POST").await;
        assert_eq!(body, b"<lab/><lb>web</lb>");
        assert_eq!(header(&fields, "content-length"), Some(&b"18"[..]));
        let (_, _, body) = ask(
            &mut client,
            &request(b"Action=DescribeLoadBalancers"),
            "POST",
        )
        .await;
        assert_eq!(
            body, b"<original/>",
            "other calls keep the emulator's answer"
        );
    }

    #[tokio::test]
    async fn an_emulator_that_is_gone_is_named() {
        let gone = {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            listener.local_addr().unwrap()
        };
        let front = front_for(gone, Edges::new()).await;
        let mut client = Conn::new(TcpStream::connect(front).await.unwrap());
        let (status, _, body) = ask(&mut client, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", "GET").await;
        assert_eq!(status, 502);
        let text = String::from_utf8(body).unwrap();
        assert!(
            text.contains("does not answer") && text.contains("rigger lab status"),
            "{text}"
        );

        let mut client = Conn::new(TcpStream::connect(front).await.unwrap());
        let (status, _, _) = ask(&mut client, b"NOT HTTP\r\n\r\n", "GET").await;
        assert_eq!(status, 400);
    }
}
