//! Connecting to AWS: one SDK configuration (credentials and endpoint from aws-config's
//! standard chain) shared by the EC2, Auto Scaling, Elastic Load Balancing (classic and v2),
//! SSM, IAM, S3 and STS clients.
//!
//! The HTTP client is hyper + rustls on ring, built here rather than through the SDK's
//! default-https-client feature, whose aws-lc build costs minutes of compile time.

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_sdk_ec2::config::{Credentials, Region};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};

/// How to reach AWS. Everything not set here comes from the standard chain: credentials from
/// the environment, profiles, SSO or an instance role; `AWS_ENDPOINT_URL` and
/// `AWS_MAX_ATTEMPTS` from the environment.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    /// The environment's region (rigger.toml's `region`).
    pub region: String,
    /// `--endpoint-url`: every service at this URL (an emulator such as moto).
    pub endpoint_url: Option<String>,
    /// Attempts per call; `Some(1)` turns the SDK's retries off (the tests do).
    pub max_attempts: Option<u32>,
    /// Fixed credentials instead of the chain: for emulators, whose tests cannot change the
    /// process environment.
    pub static_credentials: Option<(String, String)>,
}

/// The service clients of one environment.
#[derive(Debug, Clone)]
pub struct Clients {
    pub ec2: aws_sdk_ec2::Client,
    pub autoscaling: aws_sdk_autoscaling::Client,
    pub elb: aws_sdk_elasticloadbalancing::Client,
    pub elbv2: aws_sdk_elasticloadbalancingv2::Client,
    pub ssm: aws_sdk_ssm::Client,
    /// The servers' role and instance profile (IAM is global; the SDK picks its endpoint).
    pub iam: aws_sdk_iam::Client,
    /// The releases bucket ([`crate::releases`]).
    pub s3: aws_sdk_s3::Client,
    /// Instance profiles' credentials in the lab's metadata service ([`crate::lab`]).
    pub sts: aws_sdk_sts::Client,
    pub region: String,
    /// Whether every call goes to `--endpoint-url` (an emulator).
    pub endpoint_override: bool,
}

impl Clients {
    /// Loads the shared configuration. Nothing is sent yet: missing credentials show up at
    /// the first call, as an error naming it.
    pub async fn connect(connection: &Connection) -> Clients {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(connection.region.clone()))
            .http_client(https());
        if let Some(url) = &connection.endpoint_url {
            loader = loader.endpoint_url(url);
            crash_test::arm_from_environment();
        }
        if let Some(attempts) = connection.max_attempts {
            loader = loader.retry_config(RetryConfig::standard().with_max_attempts(attempts));
        }
        if let Some((id, secret)) = &connection.static_credentials {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                None,
                None,
                "rigger-static",
            ));
        }
        let shared = loader.load().await;
        Clients {
            ec2: aws_sdk_ec2::Client::new(&shared),
            autoscaling: aws_sdk_autoscaling::Client::new(&shared),
            elb: aws_sdk_elasticloadbalancing::Client::new(&shared),
            elbv2: aws_sdk_elasticloadbalancingv2::Client::new(&shared),
            ssm: aws_sdk_ssm::Client::new(&shared),
            iam: aws_sdk_iam::Client::new(&shared),
            // Emulators answer for buckets in the path, not in a virtual host's name.
            s3: aws_sdk_s3::Client::from_conf(
                aws_sdk_s3::config::Builder::from(&shared)
                    .force_path_style(connection.endpoint_url.is_some())
                    .build(),
            ),
            sts: aws_sdk_sts::Client::new(&shared),
            region: connection.region.clone(),
            endpoint_override: connection.endpoint_url.is_some()
                || std::env::var_os("AWS_ENDPOINT_URL").is_some(),
        }
    }

    /// An S3 client configured as [`Self::s3`] with a connection pool of its own, for a
    /// thread with its own runtime (connections belong to the runtime that opened them).
    pub fn separate_s3(&self) -> aws_sdk_s3::Client {
        aws_sdk_s3::Client::from_conf(self.s3.config().to_builder().http_client(https()).build())
    }
}

/// The HTTPS client every service's client uses (rustls with ring), its calls counted for
/// the crash tests when they armed [`crash_test`].
fn https() -> aws_sdk_s3::config::SharedHttpClient {
    let client = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .build_https();
    crash_test::counted(client)
}

/// The crash tests' hook: with an emulator (`--endpoint-url`) only, and only when the
/// environment asks for it, every AWS call this process makes is counted and, optionally,
/// logged one line each, and the process kills itself with SIGKILL as soon as the answer to
/// the N-th call arrives (the call took effect at AWS; rigger never saw its answer, the
/// worst moment to die). The tests pick N at random to prove that every command, killed after
/// any call, converges when it is run again.
///
/// - `RIGGER_TEST_KILL_AFTER_AWS_CALLS=N`: die after the N-th call's answer.
/// - `RIGGER_TEST_AWS_CALL_LOG=PATH`: append `N OPERATION` per call (how many calls a
///   command makes, and which one a killed run died after).
///
/// Never armed against AWS itself: a stray variable must not kill a real operation.
mod crash_test {
    use std::io::Write as _;
    use std::path::PathBuf;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    use aws_smithy_runtime_api::client::http::{
        HttpClient, HttpConnector, HttpConnectorFuture, SharedHttpClient, SharedHttpConnector,
        http_client_fn,
    };
    use aws_smithy_runtime_api::client::orchestrator::HttpRequest;

    #[derive(Debug)]
    struct Hook {
        kill_after: Option<u64>,
        log: Option<PathBuf>,
        calls: AtomicU64,
    }

    static HOOK: OnceLock<Option<Hook>> = OnceLock::new();

    pub(super) fn arm_from_environment() {
        HOOK.get_or_init(|| {
            let kill_after = std::env::var("RIGGER_TEST_KILL_AFTER_AWS_CALLS")
                .ok()
                .and_then(|n| n.trim().parse().ok());
            let log = std::env::var_os("RIGGER_TEST_AWS_CALL_LOG").map(PathBuf::from);
            (kill_after.is_some() || log.is_some()).then(|| Hook {
                kill_after,
                log,
                calls: AtomicU64::new(0),
            })
        });
    }

    fn armed() -> Option<&'static Hook> {
        HOOK.get().and_then(Option::as_ref)
    }

    pub(super) fn counted(client: SharedHttpClient) -> SharedHttpClient {
        http_client_fn(move |settings, components| {
            let inner = client.http_connector(settings, components);
            SharedHttpConnector::new(Counted { inner })
        })
    }

    #[derive(Debug)]
    struct Counted {
        inner: SharedHttpConnector,
    }

    impl HttpConnector for Counted {
        fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
            let Some(hook) = armed() else {
                return self.inner.call(request);
            };
            let operation = operation(&request);
            let answer = self.inner.call(request);
            HttpConnectorFuture::new(async move {
                let response = answer.await;
                let n = hook.calls.fetch_add(1, Ordering::SeqCst) + 1;
                if let Some(path) = &hook.log {
                    // O_APPEND: one whole line per call even from concurrent tasks.
                    if let Ok(mut file) = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                    {
                        let _ = file.write_all(format!("{n} {operation}\n").as_bytes());
                    }
                }
                if hook.kill_after == Some(n) {
                    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
                }
                response
            })
        }
    }

    /// What a request asks: the query protocol's `Action`, the JSON protocol's target, or
    /// S3's method and path.
    fn operation(request: &HttpRequest) -> String {
        if let Some(target) = request.headers().get("x-amz-target") {
            return target.to_owned();
        }
        let body = request.body().bytes().unwrap_or_default();
        let action = String::from_utf8_lossy(body)
            .split('&')
            .find_map(|pair| pair.strip_prefix("Action=").map(str::to_owned));
        action.unwrap_or_else(|| format!("{} {}", request.method(), request.uri()))
    }
}

/// Whether credentials can come from somewhere without asking the network: the environment,
/// the shared config and credentials files (profiles, SSO), a container's or a web identity's
/// variables, or this machine being an EC2 instance (read from its DMI data, not from the
/// metadata service). When none applies, the SDK's chain would end by probing the instance
/// metadata address, which off EC2 only costs time: callers report missing credentials
/// instead.
pub fn credentials_configured() -> bool {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if [
        "AWS_ACCESS_KEY_ID",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ]
    .iter()
    .any(|name| set(name))
    {
        return true;
    }
    // A shared file counts when it says something: the one its variable names (which
    // replaces `~/.aws/...`; `/dev/null` says there is none), else the one under HOME.
    let home = std::env::var_os("HOME").map(std::path::PathBuf::from);
    let has_content = |path: &std::path::Path| std::fs::metadata(path).is_ok_and(|m| m.len() > 0);
    let shared_file = |variable: &str, name: &str| match std::env::var_os(variable) {
        Some(path) if !path.is_empty() => has_content(std::path::Path::new(&path)),
        _ => home
            .as_ref()
            .is_some_and(|home| has_content(&home.join(".aws").join(name))),
    };
    if shared_file("AWS_SHARED_CREDENTIALS_FILE", "credentials")
        || shared_file("AWS_CONFIG_FILE", "config")
    {
        return true;
    }
    let on_ec2 = |path: &str, prefix: &str| {
        std::fs::read_to_string(path)
            .is_ok_and(|s| s.trim().to_ascii_lowercase().starts_with(prefix))
    };
    on_ec2("/sys/devices/virtual/dmi/id/board_asset_tag", "i-")
        || on_ec2("/sys/hypervisor/uuid", "ec2")
        || on_ec2("/sys/devices/virtual/dmi/id/sys_vendor", "amazon ec2")
}
