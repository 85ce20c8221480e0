//! Test support: a moto server on a free loopback port (killed by PID when dropped), a
//! configuration with one AWS environment, and a provider connected to the emulator with
//! retries off and fake credentials.

#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rigger_aws::{Connection, Provider, Waits};
use rigger_config::Config;

/// An AMI that moto knows in every region.
pub const AMI: &str = "ami-03cf127a";
/// The IAM server certificate [`Moto::start`] uploads (moto checks that listeners' certificates
/// exist).
pub const CERTIFICATE: &str = "arn:aws:iam::123456789012:server-certificate/rigger-test";

pub struct Moto {
    child: Child,
    pub url: String,
}

impl Moto {
    /// Installs moto if needed (scripts/moto.sh) and starts a server for this test alone.
    pub fn start() -> Moto {
        Moto::start_serving(false)
    }

    /// As [`Moto::start`], but the server answers one request at a time. moto checks a
    /// conditional write (`If-Match`, `If-None-Match`) and then writes, without a lock, so
    /// two racing requests can both pass where S3 decides atomically: the tests of rigger's
    /// compare-and-swap protocol under real concurrency need requests serialized as S3's
    /// decisions are.
    pub fn start_serialized() -> Moto {
        Moto::start_serving(true)
    }

    fn start_serving(serialized: bool) -> Moto {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let installed = Command::new(root.join("scripts/moto.sh"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/moto.sh");
        assert!(installed.status.success(), "scripts/moto.sh failed");
        let server = String::from_utf8(installed.stdout)
            .unwrap()
            .trim()
            .to_owned();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut command = if serialized {
            // moto_server's own start-up, with werkzeug's server unthreaded.
            let mut command = Command::new(Path::new(&server).with_file_name("python"));
            command.args([
                "-c",
                "import sys\n\
                 from werkzeug.serving import run_simple\n\
                 from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app\n\
                 run_simple('127.0.0.1', int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False, request_handler=MotoRequestHandler)\n",
                &port.to_string(),
            ]);
            command
        } else {
            let mut command = Command::new(&server);
            command.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
            command
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(match std::env::var_os("RIGGER_MOTO_LOG") {
                // For debugging the emulator's 500s: its tracebacks go to this file.
                Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
                None => Stdio::null(),
            })
            .spawn()
            .expect("starting moto_server");
        let moto = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
        };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "moto_server did not listen on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto.upload_certificate();
        moto
    }

    /// Uploads [`CERTIFICATE`] with a bare IAM query request: the IAM SDK is not a dependency
    /// of rigger, and moto checks neither signatures nor certificate contents.
    fn upload_certificate(&self) {
        use std::io::{Read as _, Write as _};
        let encode = |s: &str| {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        };
        let body = [
            ("Action", "UploadServerCertificate"),
            ("Version", "2010-05-08"),
            ("ServerCertificateName", "rigger-test"),
            (
                "CertificateBody",
                "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            ),
            (
                "PrivateKey",
                "-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n",
            ),
        ]
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect::<Vec<_>>()
        .join("&");
        let address = self.url.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        write!(
            stream,
            "POST / HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/x-www-form-urlencoded\r\nAuthorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        assert!(
            answer.contains(CERTIFICATE),
            "uploading the test certificate: {answer}"
        );
    }

    pub fn connection(&self) -> Connection {
        Connection {
            region: "us-east-1".into(),
            endpoint_url: Some(self.url.clone()),
            max_attempts: Some(1),
            static_credentials: Some(("testing".into(), "testing".into())),
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A configuration with environment `prod` on AWS; `extra` is appended to its table, and
/// `sizes` replaces the web/worker/database tables.
pub fn config_text(extra: &str, web_desired: u32, web_type: &str) -> String {
    format!(
        r#"
[project]
name = "shop"
app_path = "."
wsgi_module = "shop.wsgi:application"
celery_app = "shop"
domains = ["shop.example.com"]

[environments.prod]
provider = "aws"
region = "us-east-1"
ami = "{AMI}"
certificate = "{CERTIFICATE}"
admin_cidrs = ["203.0.113.0/24"]
{extra}

[environments.prod.web]
min = 1
max = 4
desired = {web_desired}
instance_type = "{web_type}"

[environments.prod.worker]
min = 1
max = 2
desired = 1

[environments.prod.database]
replicas = 1
"#
    )
}

pub fn config(text: &str) -> Config {
    rigger_config::parse(text, "rigger.toml").unwrap_or_else(|d| panic!("{d}"))
}

pub async fn provider(moto: &Moto, config: Config) -> Provider {
    let mut provider = Provider::connect(config, "prod", &moto.connection())
        .await
        .expect("an AWS environment");
    provider.waits = Waits {
        poll: Duration::from_millis(50),
        timeout: Duration::from_secs(60),
    };
    provider
}

/// The release every test deploys.
pub const RELEASE: &str = "r1";

/// The topology of the first creation (rigger.toml's counts).
pub fn topology(config: &Config) -> rigger_topology::Topology {
    rigger_topology::desired(config, "prod", RELEASE).unwrap()
}

/// Steps other than no-ops, one per line: `update security_group shop-prod-db-sg: ingress`.
pub fn actions(plan: &rigger_plan::Plan) -> Vec<String> {
    plan.steps
        .iter()
        .filter(|s| s.action != rigger_plan::Action::NoOp)
        .map(|s| {
            let changes: Vec<&str> = s.changes.iter().map(|c| c.attribute.as_str()).collect();
            format!("{:?} {}: {}", s.action, s.id, changes.join(", "))
        })
        .collect()
}

pub fn quiet(_: &str) {}
