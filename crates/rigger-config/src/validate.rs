//! From a parsed TOML document to the validated [`Config`], collecting every problem.
//!
//! [`validate`] walks the document table by table (`config` → `project`, `environment` →
//! `local`/`aws`, `group`, `database`, `cache`). Each step reads its keys through the typed
//! lookups of [`Validator`], which record a [`Diagnostic`] for a wrong type and keep going, so
//! one pass reports every problem of the file. A value that failed validation is replaced by a
//! placeholder; placeholders never escape because any diagnostic makes the result an error.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::path::PathBuf;

use toml_edit::{Array, Document, Item, TableLike, Value};

use crate::diagnostic::Diagnostic;
use crate::model::{
    AwsConfig, Bastion, CacheConfig, Cidr, Config, DatabaseConfig, Environment, GroupSizing, Hsts,
    KeyPair, LaunchKind, LoadBalancerKind, LocalConfig, Project, ProviderConfig, ProviderKind,
};
use crate::rules::{
    BastionProblem, CertificateProblem, MAX_PATH_LENGTH, PublicKeyProblem, RelativePathProblem,
    UrlPathProblem, check_certificate_arn, check_domain, check_relative_path, check_url_path,
    fix_name, is_ami, is_aws_id, is_dotted_path, is_identifier, is_instance_profile_name,
    is_instance_type, is_key_pair_name, is_name, is_region, is_unix_user, parse_bastion,
    parse_public_key, shown,
};
use crate::suggest::closest;
use crate::{CidrError, defaults};

pub(crate) fn validate(doc: &Document<&str>) -> Result<Config, Vec<Diagnostic>> {
    let mut v = Validator {
        source: doc.raw(),
        diags: Vec::new(),
        suggested: HashSet::new(),
    };
    let root = Tbl {
        inner: doc.as_table(),
        path: String::new(),
        span: 0..0,
    };
    let config = v.config(&root);
    if v.diags.is_empty() {
        Ok(config)
    } else {
        Err(v.diags)
    }
}

const ROOT_KEYS: &[&str] = &["project", "environments"];
const PROJECT_KEYS: &[&str] = &[
    "name",
    "app_path",
    "wsgi_module",
    "celery_app",
    "domains",
    "health_check_path",
    "requirements",
];
const ENV_KEYS: &[&str] = &[
    "provider",
    "web",
    "worker",
    "database",
    "cache",
    "hsts_max_age",
    "hsts_include_subdomains",
];
const LOCAL_KEYS: &[&str] = &["http_port", "https_port", "addresses"];
const AWS_KEYS: &[&str] = &[
    "region",
    "ami",
    "load_balancer",
    "certificate",
    "admin_cidrs",
    "vpc",
    "subnets",
    "key_pair",
    "admin_public_key",
    "instance_profile",
    "cpu_target",
    "launch",
    "deploy_user",
    "ssh_identity",
    "bastion",
    "ssh_port",
];
const GROUP_KEYS: &[&str] = &["min", "max", "desired", "instance_type", "volume_size"];
const DATABASE_KEYS: &[&str] = &["replicas", "instance_type", "volume_size"];
const CACHE_KEYS: &[&str] = &["shared_with_queue", "instance_type", "volume_size"];

/// A table (header, implicit, dotted or inline) with its dotted path and where to point at it.
struct Tbl<'a> {
    inner: &'a dyn TableLike,
    /// `environments.local.web`; empty for the root.
    path: String,
    /// The `[header]`, or the key that names the table when it has no header of its own.
    span: Range<usize>,
}

impl Tbl<'_> {
    /// "in `environments.local`", or "at the top level".
    fn location(&self) -> String {
        if self.path.is_empty() {
            "at the top level".to_owned()
        } else {
            format!("in `{}`", self.path)
        }
    }

    fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    fn key_span(&self, key: &str) -> Range<usize> {
        self.inner
            .key(key)
            .and_then(|k| k.span())
            .unwrap_or(self.span.clone())
    }
}

struct Spanned<T> {
    value: T,
    span: Range<usize>,
}

/// The outcome of reading one key: a type error has already been reported as `Invalid`.
enum Lookup<T> {
    Absent,
    Invalid,
    Found(Spanned<T>),
}

impl<T> Lookup<T> {
    fn found(self) -> Option<Spanned<T>> {
        match self {
            Lookup::Found(s) => Some(s),
            Lookup::Absent | Lookup::Invalid => None,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expected {
    String,
    Integer,
    Boolean,
    Array,
    Table,
}

impl Expected {
    fn name(self) -> &'static str {
        match self {
            Expected::String => "a string",
            Expected::Integer => "an integer",
            Expected::Boolean => "a boolean",
            Expected::Array => "an array",
            Expected::Table => "a table",
        }
    }
}

/// Which auto-scaled group a sizing table describes; they differ in defaults and in which
/// counts must be at least one.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Web,
    Worker,
}

struct Validator<'s> {
    source: &'s str,
    diags: Vec<Diagnostic>,
    /// `(table path, key)` pairs offered as "did you mean"; a missing-key error for them would
    /// repeat the same problem.
    suggested: HashSet<(String, String)>,
}

impl Validator<'_> {
    fn push(&mut self, d: Diagnostic) {
        self.diags.push(d);
    }

    // ----- the walk -----

    fn config(&mut self, root: &Tbl<'_>) -> Config {
        self.unknown_keys(root, ROOT_KEYS);
        let project = match self.table(root, "project") {
            Lookup::Found(t) => self.project(&t.value),
            Lookup::Absent => {
                self.push(
                    Diagnostic::new("missing `[project]` table", 0..0, "expected in this file")
                        .help(
                            "add a `[project]` table with `name`, `app_path`, `wsgi_module`, \
                             `celery_app` and `domains`;\n`rigger init` writes a starter file \
                             with all of them",
                        ),
                );
                placeholder_project()
            }
            Lookup::Invalid => placeholder_project(),
        };
        let environments = match self.table(root, "environments") {
            Lookup::Found(t) => self.environments(&t.value),
            Lookup::Absent => {
                if !self.was_suggested(root, "environments") {
                    self.push(
                        Diagnostic::new("no environments defined", 0..0, "expected in this file")
                            .help(NO_ENVIRONMENTS_HELP),
                    );
                }
                BTreeMap::new()
            }
            Lookup::Invalid => BTreeMap::new(),
        };
        Config {
            project,
            environments,
        }
    }

    fn project(&mut self, t: &Tbl<'_>) -> Project {
        self.unknown_keys(t, PROJECT_KEYS);

        let name = self.required_string(t, "name");
        if let Some(name) = &name {
            self.check_name(&name.value, name.span.clone(), "project name");
        }

        let app_path = self.required_string(t, "app_path");
        if let Some(p) = &app_path {
            self.check_relative_path(
                p,
                "app_path",
                "manage.py's directory, relative to rigger.toml",
                "keep rigger.toml in the repository, in the app's directory or above it",
            );
        }

        let wsgi_module = self.required_string(t, "wsgi_module");
        if let Some(w) = &wsgi_module {
            self.check_wsgi_module(w);
        }

        let celery_app = self.required_string(t, "celery_app");
        if let Some(c) = &celery_app {
            self.check_celery_app(c);
        }

        let domains = self.domains(t);

        let health_check_path = self.string(t, "health_check_path").found();
        if let Some(h) = &health_check_path {
            self.check_health_check_path(h);
        }

        let requirements = self.string(t, "requirements").found();
        if let Some(r) = &requirements {
            self.check_relative_path(
                r,
                "requirements",
                "the pip requirements file, relative to `app_path`",
                "a release holds only what is inside `app_path`",
            );
        }

        Project {
            name: value_or_default(name),
            app_path: PathBuf::from(value_or_default(app_path)),
            wsgi_module: value_or_default(wsgi_module),
            celery_app: value_or_default(celery_app),
            domains,
            health_check_path: health_check_path
                .map_or_else(|| defaults::HEALTH_CHECK_PATH.to_owned(), |h| h.value),
            requirements: PathBuf::from(
                requirements.map_or_else(|| defaults::REQUIREMENTS.to_owned(), |r| r.value),
            ),
        }
    }

    fn domains(&mut self, t: &Tbl<'_>) -> Vec<String> {
        let Some(array) = self.required_array(t, "domains") else {
            return Vec::new();
        };
        if array.value.is_empty() {
            self.push(
                Diagnostic::new("`domains` is empty", array.span, "no domain").help(
                    "list the site's domains, the canonical one first, e.g. \
                     `domains = [\"surveys.example.com\"]`",
                ),
            );
            return Vec::new();
        }
        let mut seen = HashSet::new();
        let mut domains = Vec::new();
        for item in self.strings_of(t, "domains", array.value) {
            if let Err(help) = check_domain(&item.value) {
                self.push(
                    Diagnostic::new(
                        format!("`{}` is not a valid domain name", item.value),
                        item.span.clone(),
                        "not a DNS name",
                    )
                    .help(help),
                );
            } else if !seen.insert(item.value.clone()) {
                self.push(
                    Diagnostic::new(
                        format!("domain `{}` is listed twice", item.value),
                        item.span.clone(),
                        "listed again",
                    )
                    .help("remove one of the two"),
                );
            }
            domains.push(item.value);
        }
        domains
    }

    fn environments(&mut self, t: &Tbl<'_>) -> BTreeMap<String, Environment> {
        if t.inner.is_empty() {
            self.push(
                Diagnostic::new(
                    "no environments defined",
                    t.span.clone(),
                    "`environments` is empty",
                )
                .help(NO_ENVIRONMENTS_HELP),
            );
            return BTreeMap::new();
        }
        let mut environments = BTreeMap::new();
        // Local environments in file order, to report address blocks used twice.
        let mut blocks: Vec<(String, Cidr, Range<usize>)> = Vec::new();
        for (name, _) in t.inner.iter() {
            let name_span = t.key_span(name);
            self.check_name(name, name_span, "environment name");
            let Lookup::Found(env) = self.table(t, name) else {
                continue;
            };
            let (environment, block) = self.environment(name, &env.value);
            if let Some((cidr, span)) = block {
                if let Some((other, _, _)) = blocks.iter().find(|(_, c, _)| *c == cidr) {
                    let free = (78..=255u8)
                        .map(|b| format!("127.{b}.0.0/16"))
                        .find(|c| !blocks.iter().any(|(_, used, _)| used.to_string() == *c))
                        .unwrap_or_else(|| "127.78.0.0/16".to_owned());
                    self.push(
                        Diagnostic::new(
                            format!(
                                "local environments `{other}` and `{name}` both use addresses \
                                 `{cidr}`"
                            ),
                            span.clone(),
                            format!("same block as `{other}`"),
                        )
                        .help(format!(
                            "give `{name}` a block of its own, e.g. `addresses = \"{free}\"`, \
                             so both can be up at once"
                        )),
                    );
                }
                blocks.push((name.to_owned(), cidr, span));
            }
            environments.insert(name.to_owned(), environment);
        }
        environments
    }

    /// The environment, and for a local one its address block with where it is set.
    fn environment(
        &mut self,
        name: &str,
        t: &Tbl<'_>,
    ) -> (Environment, Option<(Cidr, Range<usize>)>) {
        let provider = match self.required_string(t, "provider") {
            None => None,
            Some(p) => match p.value.as_str() {
                "local" => Some(ProviderKind::Local),
                "aws" => Some(ProviderKind::Aws),
                other => {
                    let mut help = String::new();
                    if let Some(s) = closest(other, ["local", "aws"]) {
                        help = format!("did you mean `{s}`? ");
                    }
                    help.push_str(
                        "rigger supports `provider = \"local\"` (everything on this machine) \
                         and `provider = \"aws\"`",
                    );
                    self.push(
                        Diagnostic::new(
                            format!("unknown provider `{other}`"),
                            p.span,
                            "not a provider",
                        )
                        .help(help),
                    );
                    None
                }
            },
        };
        self.environment_keys(name, t, provider);

        let kind = provider;
        let mut block = None;
        let provider = match provider {
            Some(ProviderKind::Local) => {
                let (local, span) = self.local(t);
                block = span.map(|span| (local.addresses, span));
                ProviderConfig::Local(local)
            }
            Some(ProviderKind::Aws) => ProviderConfig::Aws(self.aws(name, t)),
            None => ProviderConfig::Local(placeholder_local()),
        };
        let web = self.group(t, "web", Role::Web, kind);
        let worker = self.group(t, "worker", Role::Worker, kind);
        let database = self.database(t);
        let cache = self.cache(t);
        let hsts = self.hsts(t);
        let environment = Environment {
            name: name.to_owned(),
            provider,
            web,
            worker,
            database,
            cache,
            hsts,
        };
        (environment, block)
    }

    /// Reports keys unknown to environments, and keys of the other provider.
    fn environment_keys(&mut self, name: &str, t: &Tbl<'_>, provider: Option<ProviderKind>) {
        for (key, _) in t.inner.iter() {
            if ENV_KEYS.contains(&key) {
                continue;
            }
            let (owner, other) = if LOCAL_KEYS.contains(&key) {
                (ProviderKind::Local, ProviderKind::Aws)
            } else if AWS_KEYS.contains(&key) {
                (ProviderKind::Aws, ProviderKind::Local)
            } else {
                let mut candidates: Vec<&str> = ENV_KEYS.to_vec();
                match provider {
                    Some(ProviderKind::Local) => candidates.extend(LOCAL_KEYS),
                    Some(ProviderKind::Aws) => candidates.extend(AWS_KEYS),
                    None => candidates.extend(LOCAL_KEYS.iter().chain(AWS_KEYS)),
                }
                let help = sizing_table_of(key)
                    .map(|tables| format!("`{key}` belongs in a sizing table: {}", tables(name)));
                self.unknown_key(t, key, &candidates, help);
                continue;
            };
            if provider == Some(other) {
                let help = match owner {
                    ProviderKind::Aws => format!(
                        "remove it from this local environment, or set `provider = \"aws\"` if \
                         `{name}` should run on AWS"
                    ),
                    ProviderKind::Local => "remove it from this aws environment; it only sets \
                                            up environments with `provider = \"local\"`"
                        .to_owned(),
                };
                self.push(
                    Diagnostic::new(
                        format!("`{key}` applies only to {owner} environments"),
                        t.key_span(key),
                        format!("not used with provider = \"{other}\""),
                    )
                    .help(help),
                );
            }
        }
    }

    /// The local settings, and the span to blame if their address block is taken (`None` when
    /// `addresses` is invalid, which is reported already).
    fn local(&mut self, t: &Tbl<'_>) -> (LocalConfig, Option<Range<usize>>) {
        let http = self.port(t, "http_port");
        let https = self.port(t, "https_port");
        let http_port = http.as_ref().map_or(defaults::HTTP_PORT, |p| p.value);
        let https_port = https.as_ref().map_or(defaults::HTTPS_PORT, |p| p.value);
        if http_port == https_port {
            let (span, other) = match (&http, &https) {
                (_, Some(s)) if http.is_some() => (s.span.clone(), "`http_port`".to_owned()),
                (_, Some(s)) => (s.span.clone(), "the default `http_port`".to_owned()),
                (Some(s), None) => (s.span.clone(), "the default `https_port`".to_owned()),
                (None, None) => unreachable!("the default ports differ"),
            };
            self.push(
                Diagnostic::new(
                    format!("`http_port` and `https_port` are both {http_port}"),
                    span,
                    format!("same as {other}"),
                )
                .help(
                    "give HTTP and HTTPS different ports, e.g. `http_port = 8080` and \
                     `https_port = 8443`",
                ),
            );
        }

        let mut addresses = defaults::local_addresses();
        let mut span = Some(t.span.clone());
        if let Some(text) = self.string(t, "addresses").found() {
            span = None;
            if let Some(cidr) = self.cidr(&text, "addresses") {
                let loopback = Cidr {
                    addr: std::net::Ipv4Addr::new(127, 0, 0, 0),
                    prefix: 8,
                };
                let problem = if !loopback.contains(&cidr) {
                    Some((
                        "not inside 127.0.0.0/8",
                        "a local environment's servers use loopback addresses;",
                    ))
                } else if cidr.prefix != 16 {
                    Some((
                        "not a /16",
                        "a local environment takes a whole /16 of loopback addresses;",
                    ))
                } else {
                    None
                };
                if let Some((label, why)) = problem {
                    let suggestion = if loopback.contains(&cidr) {
                        let [_, b, _, _] = cidr.addr.octets();
                        format!("127.{b}.0.0/16")
                    } else {
                        defaults::local_addresses().to_string()
                    };
                    self.push(
                        Diagnostic::new(
                            format!("`addresses` must be a /16 inside 127.0.0.0/8, not `{cidr}`"),
                            text.span,
                            label,
                        )
                        .help(format!("{why} use e.g. `addresses = \"{suggestion}\"`")),
                    );
                } else {
                    addresses = cidr;
                    span = Some(text.span.clone());
                }
            }
        }
        let local = LocalConfig {
            http_port,
            https_port,
            addresses,
        };
        (local, span)
    }

    fn aws(&mut self, name: &str, t: &Tbl<'_>) -> AwsConfig {
        let region = self.required_string(t, "region");
        if let Some(r) = &region
            && !is_region(&r.value)
        {
            self.push(
                Diagnostic::new(
                    format!("`{}` is not an AWS region", r.value),
                    r.span.clone(),
                    "not a region code",
                )
                .help("write a region code such as `eu-west-1` or `us-east-1`"),
            );
        }

        let ami = self.required_string(t, "ami");
        if let Some(a) = &ami
            && !is_ami(&a.value)
        {
            self.push(
                Diagnostic::new(
                    format!("`{}` is not an AMI id", a.value),
                    a.span.clone(),
                    "not an AMI id",
                )
                .help(
                    "an AMI id is `ami-` followed by 8 to 17 lower-case hex digits, e.g. \
                     `ami = \"ami-0123456789abcdef0\"`",
                ),
            );
        }

        let mut load_balancer = LoadBalancerKind::Classic;
        if let Some(lb) = self.string(t, "load_balancer").found() {
            match lb.value.as_str() {
                "classic" => {}
                "application" => load_balancer = LoadBalancerKind::Application,
                other => {
                    let mut help = String::new();
                    if let Some(s) = closest(other, ["classic", "application"]) {
                        help = format!("did you mean `{s}`? ");
                    }
                    help.push_str(
                        "Use `\"classic\"` (Classic Load Balancer, the default) or \
                         `\"application\"` (Application Load Balancer)",
                    );
                    self.push(
                        Diagnostic::new(
                            format!("unknown load balancer kind `{other}`"),
                            lb.span,
                            "not a load balancer kind",
                        )
                        .help(help),
                    );
                }
            }
        }

        let certificate = match self.string(t, "certificate") {
            Lookup::Found(c) => {
                let region = region
                    .as_ref()
                    .map(|r| r.value.as_str())
                    .filter(|r| is_region(r));
                self.check_certificate(&c, region);
                Some(c.value)
            }
            Lookup::Absent => {
                self.push(
                    Diagnostic::new(
                        format!("aws environment `{name}` has no `certificate`"),
                        t.span.clone(),
                        "missing `certificate`",
                    )
                    .help(format!(
                        "the load balancer's HTTPS listener (port 443) needs a server \
                         certificate from ACM or IAM;\nadd its ARN here, e.g. `{}`",
                        example("certificate")
                    )),
                );
                None
            }
            Lookup::Invalid => None,
        };

        let mut admin_cidrs: Vec<Cidr> = Vec::new();
        if let Some(array) = self.array(t, "admin_cidrs").found() {
            for text in self.strings_of(t, "admin_cidrs", array.value) {
                let Some(cidr) = self.cidr(&text, "admin_cidrs") else {
                    continue;
                };
                if admin_cidrs.contains(&cidr) {
                    // EC2 refuses a rule given twice, after the other resources were made.
                    self.push(
                        Diagnostic::new(
                            format!("`{cidr}` is listed twice in `admin_cidrs`"),
                            text.span,
                            "listed again",
                        )
                        .help(
                            "remove one of the two: each network becomes one security group rule",
                        ),
                    );
                } else if cidr.prefix == 0 {
                    self.push(
                        Diagnostic::new(
                            "`admin_cidrs` would open SSH to the whole internet",
                            text.span,
                            format!("{cidr} is every address"),
                        )
                        .help(format!(
                            "SSH must not be open to the world: list your office or VPN \
                             network instead, e.g. `{}`,\nor leave `admin_cidrs` out to keep \
                             SSH closed",
                            example("admin_cidrs")
                        )),
                    );
                } else {
                    admin_cidrs.push(cidr);
                }
            }
        }

        let vpc = self.vpc(t);
        let subnets = self.subnets(t);
        let key_pair = self.key_pair(t);
        let instance_profile = self.instance_profile(t);
        let cpu_target = self.cpu_target(t);
        let launch = self.launch(t);
        let deploy_user = self.deploy_user(t);
        let ssh_identity = self.ssh_identity(t);
        let bastion = self.bastion(t);
        let ssh_port = self
            .port(t, "ssh_port")
            .map_or(defaults::SSH_PORT, |p| p.value);

        AwsConfig {
            region: value_or_default(region),
            ami: value_or_default(ami),
            load_balancer,
            certificate,
            admin_cidrs,
            vpc,
            subnets,
            key_pair,
            instance_profile,
            cpu_target,
            launch,
            deploy_user,
            ssh_identity,
            bastion,
            ssh_port,
        }
    }

    /// `certificate`: the ARN of an ACM certificate of the environment's `region` (when that
    /// is valid) or of an IAM server certificate (`rules::check_certificate_arn`).
    fn check_certificate(&mut self, c: &Spanned<String>, region: Option<&str>) {
        const GRAMMAR: &str = "an ACM certificate's ARN is \
                               `arn:aws:acm:REGION:ACCOUNT:certificate/ID` (ID: letters, digits \
                               and `-`), an IAM server certificate's \
                               `arn:aws:iam::ACCOUNT:server-certificate/NAME` (NAME: letters, \
                               digits and `+=,.@_-/`), ACCOUNT being 12 digits";
        let problem = match check_certificate_arn(&c.value) {
            Ok(Some(acm_region)) if region.is_some_and(|r| r != acm_region) => {
                let region = region.unwrap_or_default();
                self.push(
                    Diagnostic::new(
                        format!(
                            "the certificate is in `{acm_region}`, the environment in `{region}`"
                        ),
                        c.span.clone(),
                        format!("not in {region}"),
                    )
                    .help(format!(
                        "a load balancer can only use an ACM certificate of its own region: \
                         request or import the certificate in `{region}` and give that ARN \
                         (`aws acm list-certificates --region {region}`)"
                    )),
                );
                return;
            }
            Ok(_) => return,
            Err(problem) => problem,
        };
        let (message, label) = match problem {
            CertificateProblem::NotArn => (
                "`certificate` must be the ARN of a certificate".to_owned(),
                "not an ARN".to_owned(),
            ),
            CertificateProblem::NotCertificate => (
                "`certificate` is not the ARN of an ACM or IAM server certificate".to_owned(),
                "not a certificate's ARN".to_owned(),
            ),
            CertificateProblem::Region => (
                "the region in `certificate` is not a region code".to_owned(),
                "not `arn:aws:acm:REGION:...`".to_owned(),
            ),
            CertificateProblem::Account => (
                "the account in `certificate` is not 12 digits".to_owned(),
                "bad account id".to_owned(),
            ),
            CertificateProblem::Character(c) => (
                format!(
                    "`certificate` contains {}, which no certificate's ARN has",
                    shown(c)
                ),
                format!("{} is not allowed", shown(c)),
            ),
            CertificateProblem::TooLong => (
                "`certificate` is too long for an ARN".to_owned(),
                "too long".to_owned(),
            ),
        };
        self.push(
            Diagnostic::new(message, c.span.clone(), label).help(format!(
                "give the ARN that `aws acm list-certificates` shows, e.g. `{}`;\n{GRAMMAR}",
                example("certificate")
            )),
        );
    }

    fn vpc(&mut self, t: &Tbl<'_>) -> Option<String> {
        let vpc = self.string(t, "vpc").found()?;
        if is_aws_id(&vpc.value, "vpc") {
            return Some(vpc.value);
        }
        self.push(
            Diagnostic::new(
                format!("`{}` is not a VPC id", vpc.value),
                vpc.span,
                "not a VPC id",
            )
            .help(
                "give the id `aws ec2 describe-vpcs` shows, `vpc-` followed by hex digits, e.g. \
                 `vpc = \"vpc-0a1b2c3d4e5f67890\"`;\nleave `vpc` out to use the region's \
                 default VPC",
            ),
        );
        None
    }

    fn subnets(&mut self, t: &Tbl<'_>) -> Vec<String> {
        let Some(array) = self.array(t, "subnets").found() else {
            return Vec::new();
        };
        if array.value.is_empty() {
            self.push(
                Diagnostic::new("`subnets` is empty", array.span, "no subnet").help(
                    "list the subnets the servers go in, one per availability zone, e.g. \
                     `subnets = [\"subnet-0a1b2c3d\", \"subnet-4e5f6a7b\"]`,\nor leave \
                     `subnets` out to use the VPC's default subnets",
                ),
            );
            return Vec::new();
        }
        let mut subnets: Vec<String> = Vec::new();
        for item in self.strings_of(t, "subnets", array.value) {
            if !is_aws_id(&item.value, "subnet") {
                self.push(
                    Diagnostic::new(
                        format!("`{}` is not a subnet id", item.value),
                        item.span,
                        "not a subnet id",
                    )
                    .help(
                        "give the ids `aws ec2 describe-subnets` shows, `subnet-` followed by \
                         hex digits, e.g. `\"subnet-0a1b2c3d\"`",
                    ),
                );
            } else if subnets.contains(&item.value) {
                self.push(
                    Diagnostic::new(
                        format!("subnet `{}` is listed twice", item.value),
                        item.span,
                        "listed again",
                    )
                    .help("remove one of the two"),
                );
            } else {
                subnets.push(item.value);
            }
        }
        subnets
    }

    fn key_pair(&mut self, t: &Tbl<'_>) -> Option<KeyPair> {
        let existing = self.string(t, "key_pair").found();
        let public_key = self.string(t, "admin_public_key").found();
        if let (Some(name), Some(key)) = (&existing, &public_key) {
            let (later, other) = if key.span.start > name.span.start {
                (key.span.clone(), "`key_pair`")
            } else {
                (name.span.clone(), "`admin_public_key`")
            };
            self.push(
                Diagnostic::new(
                    "`key_pair` and `admin_public_key` cannot both be set",
                    later,
                    format!("{other} is set too"),
                )
                .help(
                    "keep one: `key_pair` names a key pair that already exists in the region; \
                     `admin_public_key` is a public key rigger imports as the key pair \
                     `<project>-<env>`",
                ),
            );
            return None;
        }
        if let Some(name) = existing {
            if is_key_pair_name(&name.value) {
                return Some(KeyPair::Existing(name.value));
            }
            let bad = name
                .value
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)));
            let (message, label) = match bad {
                Some(c) => (
                    format!(
                        "`key_pair` contains {}, which rigger does not accept in it",
                        shown(c)
                    ),
                    format!("{} is not allowed", shown(c)),
                ),
                None => (
                    format!("`{}` is not a key pair name", name.value),
                    "not a key pair name".to_owned(),
                ),
            };
            self.push(Diagnostic::new(message, name.span, label).help(
                "give the name `aws ec2 describe-key-pairs` shows: rigger accepts 1 to 255 \
                     letters, digits, `.`, `_` and `-`, e.g. `key_pair = \"admin\"`;\nfor a key \
                     pair named otherwise, import its public key with `admin_public_key` instead",
            ));
            return None;
        }
        let key = public_key?;
        let problem = match parse_public_key(&key.value) {
            Ok(key) => return Some(KeyPair::Import(key)),
            Err(problem) => problem,
        };
        let (message, label, help) = match problem {
            PublicKeyProblem::PrivateKey => (
                "`admin_public_key` holds a private key",
                "a private key",
                "never put a private key in rigger.toml (and replace this one: it is no longer \
                 secret);\ngive the public key, the one line of e.g. `~/.ssh/id_ed25519.pub`",
            ),
            PublicKeyProblem::Path => (
                "`admin_public_key` is a file name, not a key",
                "a path",
                "paste the contents of the file: one line starting with `ssh-ed25519` or \
                 `ssh-rsa`",
            ),
            PublicKeyProblem::UnsupportedType => (
                "EC2 cannot import this type of key",
                "not RSA or ED25519",
                "EC2 imports `ssh-ed25519` and `ssh-rsa` keys; make one with \
                 `ssh-keygen -t ed25519`",
            ),
            PublicKeyProblem::NotAKey => (
                "`admin_public_key` is not an OpenSSH public key",
                "not `TYPE KEY [COMMENT]`",
                "give one line such as `ssh-ed25519 AAAAC3Nza... you@host`: the contents of \
                 e.g. `~/.ssh/id_ed25519.pub`",
            ),
            PublicKeyProblem::Damaged => (
                "the key data of `admin_public_key` is damaged",
                "not a whole key",
                "copy the whole line of the `.pub` file again; the part after the key type is \
                 one long base64 word",
            ),
        };
        self.push(Diagnostic::new(message, key.span, label).help(help));
        None
    }

    fn instance_profile(&mut self, t: &Tbl<'_>) -> Option<String> {
        let profile = self.string(t, "instance_profile").found()?;
        if is_instance_profile_name(&profile.value) {
            return Some(profile.value);
        }
        let help = match profile.value.rsplit_once(":instance-profile/") {
            Some((_, path)) => format!(
                "give the profile's name, not its ARN: `instance_profile = \"{}\"`",
                path.rsplit('/').next().unwrap_or(path)
            ),
            None => "give the name of an IAM instance profile (letters, digits and `+=,.@_-`), \
                     or leave `instance_profile` out and rigger creates one"
                .to_owned(),
        };
        self.push(
            Diagnostic::new(
                format!("`{}` is not an instance profile name", profile.value),
                profile.span,
                "not a profile name",
            )
            .help(help),
        );
        None
    }

    fn cpu_target(&mut self, t: &Tbl<'_>) -> u32 {
        let Some(n) = self.integer(t, "cpu_target").found() else {
            return defaults::CPU_TARGET;
        };
        if let Some(v) = u32::try_from(n.value)
            .ok()
            .filter(|v| (1..=100).contains(v))
        {
            return v;
        }
        self.push(
            Diagnostic::new(
                "`cpu_target` must be between 1 and 100",
                n.span,
                "not a percentage",
            )
            .help(format!(
                "give the average CPU utilization in percent the groups scale to keep, e.g. \
                 `cpu_target = {}`",
                defaults::CPU_TARGET
            )),
        );
        defaults::CPU_TARGET
    }

    fn launch(&mut self, t: &Tbl<'_>) -> LaunchKind {
        let Some(launch) = self.string(t, "launch").found() else {
            return LaunchKind::Template;
        };
        match launch.value.as_str() {
            "template" => LaunchKind::Template,
            "configuration" => LaunchKind::Configuration,
            other => {
                let mut help = String::new();
                if let Some(s) = closest(other, ["template", "configuration"]) {
                    help = format!("did you mean `{s}`? ");
                }
                help.push_str(
                    "Use `\"template\"` (launch templates, the default) or `\"configuration\"` \
                     (legacy launch configurations)",
                );
                self.push(
                    Diagnostic::new(
                        format!("unknown launch kind `{other}`"),
                        launch.span,
                        "not a launch kind",
                    )
                    .help(help),
                );
                LaunchKind::Template
            }
        }
    }

    fn deploy_user(&mut self, t: &Tbl<'_>) -> String {
        let Some(user) = self.string(t, "deploy_user").found() else {
            return defaults::DEPLOY_USER.to_owned();
        };
        if is_unix_user(&user.value) {
            return user.value;
        }
        let lower = user.value.to_ascii_lowercase();
        let mut help = if lower != user.value && is_unix_user(&lower) {
            format!("user names are lower case: `deploy_user = \"{lower}\"`;\n")
        } else {
            String::new()
        };
        help.push_str(
            "give the user the servers' image lets in with the key pair: `admin` on Debian (the \
             default), `ubuntu` on Ubuntu, `ec2-user` on Amazon Linux",
        );
        self.push(
            Diagnostic::new(
                format!("`{}` is not a user name", user.value),
                user.span,
                "not a unix user name",
            )
            .help(help),
        );
        defaults::DEPLOY_USER.to_owned()
    }

    fn ssh_identity(&mut self, t: &Tbl<'_>) -> Option<PathBuf> {
        let path = self.string(t, "ssh_identity").found()?;
        let (message, label, help) = if path.value.contains("PRIVATE KEY") {
            (
                "`ssh_identity` holds a private key".to_owned(),
                "a key, not a path",
                "never put a private key in rigger.toml (and replace this one: it is no longer \
                 secret);\ngive the path of its file, e.g. `ssh_identity = \"~/.ssh/id_ed25519\"`"
                    .to_owned(),
            )
        } else if path.value.trim().is_empty() {
            (
                "`ssh_identity` is empty".to_owned(),
                "empty path",
                format!(
                    "give the private key's path, e.g. `{}`,\nor leave `ssh_identity` out to use \
                     ssh-agent and ssh's default keys",
                    example("ssh_identity")
                ),
            )
        } else if let Some(c) = path
            .value
            .chars()
            .find(|c| c.is_whitespace() || c.is_control() || "\"'\\".contains(*c))
        {
            (
                format!(
                    "`ssh_identity` contains {}, which rigger does not accept in it",
                    shown(c)
                ),
                "not allowed in the path",
                "ssh reads the path as an option's value, where white space, quotes and `\\` \
                 change its meaning; move or link the key to a path without them"
                    .to_owned(),
            )
        } else if let Some(private) = path.value.strip_suffix(".pub") {
            (
                "`ssh_identity` names a public key".to_owned(),
                "a `.pub` file",
                format!(
                    "ssh needs the private key, the same file without `.pub`: \
                     `ssh_identity = \"{private}\"`"
                ),
            )
        } else {
            return Some(PathBuf::from(path.value));
        };
        self.push(Diagnostic::new(message, path.span, label).help(help));
        None
    }

    fn bastion(&mut self, t: &Tbl<'_>) -> Option<Bastion> {
        let text = self.string(t, "bastion").found()?;
        let problem = match parse_bastion(&text.value) {
            Ok((user, host, port)) => return Some(Bastion { user, host, port }),
            Err(problem) => problem,
        };
        let form = format!(
            "write `user@host` or `user@host:port`, e.g. `{}`",
            example("bastion")
        );
        let (message, label, help) = match problem {
            BastionProblem::Scheme => {
                let plain = text
                    .value
                    .split_once("://")
                    .map_or("", |(_, rest)| rest.trim_end_matches('/'));
                (
                    "`bastion` is a URL".to_owned(),
                    "not `user@host[:port]`",
                    format!("leave out the scheme: `bastion = \"{plain}\"`"),
                )
            }
            BastionProblem::NoUser => (
                "`bastion` does not say which user to log in as".to_owned(),
                "no `user@`",
                format!("{form};\nthe user is the bastion's own, not necessarily `deploy_user`"),
            ),
            BastionProblem::User(user) => (
                format!("`{user}` is not a user name"),
                "not a unix user name",
                format!("{form}; user names are lower-case letters, digits, `_` and `-`"),
            ),
            BastionProblem::Host(host) => (
                format!("`{host}` is not a host name or IP address"),
                "not a host",
                form,
            ),
            BastionProblem::Port(port) => (
                format!("`{port}` is not a port"),
                "not a port",
                format!("{form}; a port is a number from 1 to 65535"),
            ),
        };
        self.push(Diagnostic::new(message, text.span, label).help(help));
        None
    }

    fn group(
        &mut self,
        env: &Tbl<'_>,
        key: &str,
        role: Role,
        provider: Option<ProviderKind>,
    ) -> GroupSizing {
        let d = match role {
            Role::Web => defaults::web(),
            Role::Worker => defaults::worker(),
        };
        let Lookup::Found(t) = self.table(env, key) else {
            return d;
        };
        let t = t.value;
        self.unknown_keys(&t, GROUP_KEYS);

        let mut min = self.count(&t, "min");
        let mut max = self.count(&t, "max");
        let mut desired = self.count(&t, "desired");
        let instance_type = self.instance_type(&t);
        let volume_size = self.volume_size(&t);

        let (limit, why) = if provider == Some(ProviderKind::Local) {
            (
                GroupSizing::MAX_LOCAL_SERVERS,
                "a local group's servers take their addresses from the 250 hosts of one /24 \
                 of `addresses`, numbered for the environment's lifetime, and a rolling deploy \
                 runs up to twice `max` at once",
            )
        } else {
            (
                GroupSizing::MAX_SERVERS,
                "every server of a group is a resource of the plan; a larger group is almost \
                 certainly a typo (and beyond any account's default EC2 quota)",
            )
        };
        let mut too_large = false;
        for (k, count) in [
            ("min", &mut min),
            ("desired", &mut desired),
            ("max", &mut max),
        ] {
            if let Some(c) = count.take_if(|c| c.value > limit) {
                too_large = true;
                self.push(
                    Diagnostic::new(
                        format!("`{k}` in `{}` is {}, more than {limit}", t.path, c.value),
                        c.span,
                        format!("at most {limit}"),
                    )
                    .help(format!("give a group at most {limit} servers: {why}")),
                );
            }
        }

        let zero_allowed: &[&str] = match role {
            Role::Web => &[],
            Role::Worker => &["min", "desired"],
        };
        let mut zero = false;
        for (k, count) in [("min", &min), ("desired", &desired), ("max", &max)] {
            if let Some(c) = count.as_ref().filter(|c| c.value == 0) {
                if zero_allowed.contains(&k) {
                    continue;
                }
                zero = true;
                let (label, why) = match role {
                    Role::Web => (
                        "no web server",
                        "the load balancer needs at least one web server to send requests to",
                    ),
                    Role::Worker => (
                        "no worker could ever run",
                        "with no worker, queued Celery tasks are never run",
                    ),
                };
                self.push(
                    Diagnostic::new(
                        format!("`{k}` in `{}` must be at least 1", t.path),
                        c.span.clone(),
                        label,
                    )
                    .help(format!("{why}; set `{k} = 1` or more")),
                );
            }
        }

        let min_v = min.as_ref().map_or(d.min, |c| c.value);
        let max_v = max.as_ref().map_or(d.max, |c| c.value);
        let mut desired_v = desired.as_ref().map_or(d.desired, |c| c.value);
        if zero || too_large {
            // A count of 0 or too many already explains the group; its bounds would only
            // repeat it.
        } else if min_v > max_v {
            self.push(min_above_max(&t, &min, &max, min_v, max_v));
        } else if let Some(des) = &desired {
            if !(min_v..=max_v).contains(&des.value) {
                let describe = |written: bool, value: u32| {
                    if written {
                        value.to_string()
                    } else {
                        format!("{value}, the default")
                    }
                };
                self.push(
                    Diagnostic::new(
                        format!(
                            "`desired` ({}) is not between `min` ({}) and `max` ({}) in `{}`",
                            des.value,
                            describe(min.is_some(), min_v),
                            describe(max.is_some(), max_v),
                            t.path
                        ),
                        des.span.clone(),
                        format!("outside {min_v}..={max_v}"),
                    )
                    .help(format!(
                        "set `desired` between {min_v} and {max_v}: it is how many servers \
                         start, and the auto-scaler keeps the count within `min`..`max`"
                    )),
                );
            }
        } else {
            // An unwritten `desired` follows the written bounds rather than contradict them.
            desired_v = d.desired.clamp(min_v, max_v);
        }

        GroupSizing {
            min: min_v,
            max: max_v,
            desired: desired_v,
            instance_type: instance_type.unwrap_or(d.instance_type),
            volume_size: volume_size.unwrap_or(d.volume_size),
        }
    }

    fn database(&mut self, env: &Tbl<'_>) -> DatabaseConfig {
        let d = defaults::database();
        let Lookup::Found(t) = self.table(env, "database") else {
            return d;
        };
        let t = t.value;
        self.unknown_keys(&t, DATABASE_KEYS);
        let limit = DatabaseConfig::MAX_REPLICAS;
        let replicas = match self.count(&t, "replicas") {
            Some(r) if r.value > limit => {
                self.push(
                    Diagnostic::new(
                        format!(
                            "`replicas` in `{}` is {}, more than {limit}",
                            t.path, r.value
                        ),
                        r.span,
                        format!("at most {limit}"),
                    )
                    .help(format!(
                        "give at most {limit} replicas: each holds one of the primary's 10 WAL \
                         senders (PostgreSQL's `max_wal_senders`), and rebuilding a replica \
                         takes two more while the others stream"
                    )),
                );
                None
            }
            r => r.map(|r| r.value),
        };
        DatabaseConfig {
            replicas: replicas.unwrap_or(d.replicas),
            instance_type: self.instance_type(&t).unwrap_or(d.instance_type),
            volume_size: self.volume_size(&t).unwrap_or(d.volume_size),
        }
    }

    fn cache(&mut self, env: &Tbl<'_>) -> CacheConfig {
        let d = defaults::cache();
        let Lookup::Found(t) = self.table(env, "cache") else {
            return d;
        };
        let t = t.value;
        self.unknown_keys(&t, CACHE_KEYS);
        let shared = self.boolean(&t, "shared_with_queue").found();
        CacheConfig {
            shared_with_queue: shared.map_or(d.shared_with_queue, |s| s.value),
            instance_type: self.instance_type(&t).unwrap_or(d.instance_type),
            volume_size: self.volume_size(&t).unwrap_or(d.volume_size),
        }
    }

    /// `hsts_max_age` and `hsts_include_subdomains`: no header unless a max age is given.
    fn hsts(&mut self, t: &Tbl<'_>) -> Option<Hsts> {
        let max_age = self.integer(t, "hsts_max_age").found();
        let include_subdomains = self.boolean(t, "hsts_include_subdomains").found();
        let Some(max_age) = max_age else {
            if let Some(include) = include_subdomains {
                self.push(
                    Diagnostic::new(
                        format!(
                            "`hsts_include_subdomains` without `hsts_max_age` in `{}`",
                            t.path
                        ),
                        include.span,
                        "no header to add it to",
                    )
                    .help(
                        "HSTS is off unless `hsts_max_age` is set: add e.g. \
                         `hsts_max_age = 31536000` (one year), or remove this key",
                    ),
                );
            }
            return None;
        };
        let Some(seconds) = u32::try_from(max_age.value)
            .ok()
            .filter(|s| *s <= Hsts::MAX_AGE_LIMIT)
        else {
            self.push(
                Diagnostic::new(
                    format!(
                        "`hsts_max_age` in `{}` must be between 0 and {} (two years)",
                        t.path,
                        Hsts::MAX_AGE_LIMIT
                    ),
                    max_age.span,
                    "out of range",
                )
                .help(
                    "give the seconds browsers keep to HTTPS, e.g. `hsts_max_age = 31536000` \
                     (one year); 0 tells them to forget an earlier header",
                ),
            );
            return None;
        };
        Some(Hsts {
            max_age: seconds,
            include_subdomains: include_subdomains.is_some_and(|i| i.value),
        })
    }

    // ----- single values -----

    fn check_name(&mut self, name: &str, span: Range<usize>, what: &str) {
        if is_name(name) {
            return;
        }
        let fixed = fix_name(name);
        let example = if is_name(&fixed) {
            fixed
        } else {
            "surveys".to_owned()
        };
        self.push(
            Diagnostic::new(format!("invalid {what} `{name}`"), span, "not a valid name").help(
                format!(
                    "use 1 to 31 lower-case letters, digits and `-`, starting with a letter \
                     (it becomes part of resource names), e.g. `{example}`"
                ),
            ),
        );
    }

    /// `app_path` and `requirements`: a path below the directory it is relative to, in
    /// characters that mean nothing to a shell (`rules::check_relative_path`).
    fn check_relative_path(&mut self, p: &Spanned<String>, key: &str, what: &str, inside: &str) {
        const CHARACTERS: &str = "letters, digits, `.`, `_`, `-` and `/`";
        let problem = match check_relative_path(&p.value) {
            Ok(()) => return,
            Err(problem) => problem,
        };
        let (message, label, help) = match problem {
            RelativePathProblem::Empty => (
                format!("`{key}` is empty"),
                "empty path".to_owned(),
                format!("give {what}, e.g. `{}`", example(key)),
            ),
            RelativePathProblem::Absolute => (
                format!("`{key}` must be a relative path"),
                "absolute path".to_owned(),
                format!(
                    "give {what}, so the project works from any checkout, e.g. `{}`",
                    example(key)
                ),
            ),
            RelativePathProblem::Parent => (
                format!("`{key}` must not leave its directory with `..`"),
                "goes up with `..`".to_owned(),
                format!(
                    "give {what}, without `..`: {inside}; e.g. `{}`",
                    example(key)
                ),
            ),
            RelativePathProblem::Dash => (
                format!("a part of `{key}` starts with `-`"),
                "starts with `-`".to_owned(),
                format!(
                    "commands would read it as an option; rename the file or directory, e.g. \
                     `{}`",
                    example(key)
                ),
            ),
            RelativePathProblem::Character(c) => (
                format!(
                    "`{key}` contains {}, which rigger does not accept in a path",
                    shown(c)
                ),
                format!("{} is not allowed", shown(c)),
                format!(
                    "a path in rigger.toml uses only {CHARACTERS} (no spaces, quotes or shell \
                     characters): it reaches shell lines and configuration files on the \
                     servers; rename the file or directory, e.g. `{}`",
                    example(key)
                ),
            ),
            RelativePathProblem::TooLong => (
                format!("`{key}` is longer than {MAX_PATH_LENGTH} characters"),
                "too long".to_owned(),
                format!("give {what}, e.g. `{}`", example(key)),
            ),
        };
        self.push(Diagnostic::new(message, p.span.clone(), label).help(help));
    }

    fn check_wsgi_module(&mut self, w: &Spanned<String>) {
        let valid = w
            .value
            .split_once(':')
            .is_some_and(|(module, attr)| is_dotted_path(module) && is_identifier(attr));
        if valid {
            return;
        }
        let help = if !w.value.contains(':') && is_dotted_path(&w.value) {
            format!(
                "gunicorn needs `module.path:attribute`; did you mean `\"{}:application\"`?",
                w.value
            )
        } else {
            format!(
                "gunicorn needs `module.path:attribute`, e.g. `{}`",
                example("wsgi_module")
            )
        };
        let label = if w.value.contains(':') {
            "not `module.path:attribute`"
        } else {
            "missing `:attribute`"
        };
        self.push(
            Diagnostic::new(
                format!("invalid `wsgi_module` `{}`", w.value),
                w.span.clone(),
                label,
            )
            .help(help),
        );
    }

    fn check_celery_app(&mut self, c: &Spanned<String>) {
        let (module, attr) = match c.value.split_once(':') {
            Some((m, a)) => (m, Some(a)),
            None => (c.value.as_str(), None),
        };
        if is_dotted_path(module) && attr.is_none_or(is_identifier) {
            return;
        }
        self.push(
            Diagnostic::new(
                format!("invalid `celery_app` `{}`", c.value),
                c.span.clone(),
                "not a Python module path",
            )
            .help(
                "give the Celery application as for `celery -A`: a module path, optionally \
                 with `:attribute`, e.g. `celery_app = \"surveys\"`",
            ),
        );
    }

    /// The health check path: an absolute URL path in characters that mean nothing to the
    /// load balancer, nginx or a shell (`rules::check_url_path`).
    fn check_health_check_path(&mut self, h: &Spanned<String>) {
        const RULE: &str = "a health check path is `/` followed by letters, digits, `.`, `_`, \
                            `-` and `/`, without a query string or `..`: it reaches the load \
                            balancer, nginx and shell lines on the servers;\ne.g. \
                            `health_check_path = \"/healthcheck.html\"`";
        let problem = match check_url_path(&h.value) {
            Ok(()) => return,
            Err(problem) => problem,
        };
        let (message, label, help) = match problem {
            UrlPathProblem::Character(c) if c.is_whitespace() => (
                "`health_check_path` contains white space".to_owned(),
                "not a URL path".to_owned(),
                "a URL path has no spaces, e.g. `health_check_path = \"/healthcheck.html\"`"
                    .to_owned(),
            ),
            // A relative path of good characters: the fix is a leading `/`.
            UrlPathProblem::Relative if check_url_path(&format!("/{}", h.value)).is_ok() => (
                format!(
                    "`health_check_path` must be a path starting with `/`, not `{}`",
                    h.value
                ),
                "not an absolute URL path".to_owned(),
                format!("did you mean `\"/{}\"`?", h.value),
            ),
            UrlPathProblem::Relative => (
                "`health_check_path` must be a path starting with `/`".to_owned(),
                "not an absolute URL path".to_owned(),
                RULE.to_owned(),
            ),
            UrlPathProblem::Character(c) => (
                format!(
                    "`health_check_path` contains {}, which rigger does not accept in it",
                    shown(c)
                ),
                format!("{} is not allowed", shown(c)),
                RULE.to_owned(),
            ),
            UrlPathProblem::Parent => (
                "`health_check_path` must not contain `..`".to_owned(),
                "has a `..` segment".to_owned(),
                RULE.to_owned(),
            ),
            UrlPathProblem::TooLong => (
                format!("`health_check_path` is longer than {MAX_PATH_LENGTH} characters"),
                "too long".to_owned(),
                RULE.to_owned(),
            ),
        };
        self.push(Diagnostic::new(message, h.span.clone(), label).help(help));
    }

    fn count(&mut self, t: &Tbl<'_>, key: &str) -> Option<Spanned<u32>> {
        let n = self.integer(t, key).found()?;
        match u32::try_from(n.value) {
            Ok(value) => Some(Spanned {
                value,
                span: n.span,
            }),
            Err(_) => {
                let (message, label) = if n.value < 0 {
                    (
                        format!("`{key}` in `{}` must not be negative", t.path),
                        "negative",
                    )
                } else {
                    (format!("`{key}` in `{}` is too large", t.path), "too large")
                };
                self.push(
                    Diagnostic::new(message, n.span, label)
                        .help(format!("write a count of servers, e.g. `{}`", example(key))),
                );
                None
            }
        }
    }

    fn port(&mut self, t: &Tbl<'_>, key: &str) -> Option<Spanned<u16>> {
        let n = self.integer(t, key).found()?;
        match u16::try_from(n.value) {
            Ok(value) if value > 0 => Some(Spanned {
                value,
                span: n.span,
            }),
            _ => {
                self.push(
                    Diagnostic::new(
                        format!("`{key}` must be between 1 and 65535"),
                        n.span,
                        "not a port",
                    )
                    .help(format!("pick a free TCP port, e.g. `{}`", example(key))),
                );
                None
            }
        }
    }

    fn instance_type(&mut self, t: &Tbl<'_>) -> Option<String> {
        let s = self.string(t, "instance_type").found()?;
        if is_instance_type(&s.value) {
            return Some(s.value);
        }
        self.push(
            Diagnostic::new(
                format!("`{}` is not an EC2 instance type", s.value),
                s.span,
                "not `family.size`",
            )
            .help("write an instance type such as `t3.small` or `m5.large`"),
        );
        None
    }

    fn volume_size(&mut self, t: &Tbl<'_>) -> Option<u32> {
        let n = self.integer(t, "volume_size").found()?;
        if let Some(v) = u32::try_from(n.value)
            .ok()
            .filter(|v| (1..=16384).contains(v))
        {
            return Some(v);
        }
        self.push(
            Diagnostic::new(
                format!("`volume_size` in `{}` must be between 1 and 16384", t.path),
                n.span,
                "out of range",
            )
            .help("give the data volume's size in GiB, e.g. `volume_size = 20`"),
        );
        None
    }

    fn cidr(&mut self, text: &Spanned<String>, key: &str) -> Option<Cidr> {
        let err = match text.value.parse::<Cidr>() {
            Ok(cidr) => return Some(cidr),
            Err(err) => err,
        };
        let (label, help) = match &err {
            CidrError::MissingPrefix { addr: Some(addr) } => (
                "missing `/prefix`".to_owned(),
                format!("add the prefix length, e.g. `{addr}/32` for this one address"),
            ),
            CidrError::MissingPrefix { addr: None } | CidrError::BadAddress(_) => (
                "not `address/prefix`".to_owned(),
                "write an IPv4 network as `address/prefix`, e.g. `203.0.113.0/24`".to_owned(),
            ),
            CidrError::BadPrefix(_) => (
                "prefix out of range".to_owned(),
                "the prefix length after `/` is a number from 0 to 32".to_owned(),
            ),
            CidrError::HostBitsSet { network } => (
                format!("bits after the first {} must be zero", network.prefix),
                format!("did you mean `{network}`?"),
            ),
        };
        self.push(
            Diagnostic::new(
                format!("invalid CIDR `{}` in `{key}`: {err}", text.value),
                text.span.clone(),
                label,
            )
            .help(help),
        );
        None
    }

    // ----- typed lookups -----

    fn get<'a>(&self, t: &Tbl<'a>, key: &str) -> Option<(&'a Item, Range<usize>)> {
        let item = t.inner.get(key)?;
        let span = item.span().unwrap_or_else(|| t.key_span(key));
        Some((item, span))
    }

    fn string(&mut self, t: &Tbl<'_>, key: &str) -> Lookup<String> {
        let Some((item, span)) = self.get(t, key) else {
            return Lookup::Absent;
        };
        match item.as_str() {
            Some(s) => Lookup::Found(Spanned {
                value: s.to_owned(),
                span,
            }),
            None => self.wrong_type(t, key, item, span, Expected::String),
        }
    }

    fn integer(&mut self, t: &Tbl<'_>, key: &str) -> Lookup<i64> {
        let Some((item, span)) = self.get(t, key) else {
            return Lookup::Absent;
        };
        match item.as_integer() {
            Some(value) => Lookup::Found(Spanned { value, span }),
            None => self.wrong_type(t, key, item, span, Expected::Integer),
        }
    }

    fn boolean(&mut self, t: &Tbl<'_>, key: &str) -> Lookup<bool> {
        let Some((item, span)) = self.get(t, key) else {
            return Lookup::Absent;
        };
        match item.as_bool() {
            Some(value) => Lookup::Found(Spanned { value, span }),
            None => self.wrong_type(t, key, item, span, Expected::Boolean),
        }
    }

    fn array<'a>(&mut self, t: &Tbl<'a>, key: &str) -> Lookup<&'a Array> {
        let Some((item, span)) = self.get(t, key) else {
            return Lookup::Absent;
        };
        match item.as_array() {
            Some(value) => Lookup::Found(Spanned { value, span }),
            None => self.wrong_type(t, key, item, span, Expected::Array),
        }
    }

    fn table<'a>(&mut self, t: &Tbl<'a>, key: &str) -> Lookup<Tbl<'a>> {
        let Some((item, span)) = self.get(t, key) else {
            return Lookup::Absent;
        };
        match item.as_table_like() {
            Some(inner) => Lookup::Found(Spanned {
                value: Tbl {
                    inner,
                    path: t.child_path(key),
                    span: span.clone(),
                },
                span,
            }),
            None => self.wrong_type(t, key, item, span, Expected::Table),
        }
    }

    /// The strings of an array, reporting every element that is not one.
    fn strings_of(&mut self, t: &Tbl<'_>, key: &str, array: &Array) -> Vec<Spanned<String>> {
        let mut out = Vec::new();
        for value in array.iter() {
            let span = value.span().unwrap_or_else(|| t.key_span(key));
            match value.as_str() {
                Some(s) => out.push(Spanned {
                    value: s.to_owned(),
                    span,
                }),
                None => {
                    let raw = self.source[span.clone()].to_owned();
                    self.push(
                        Diagnostic::new(
                            format!("wrong type for an element of `{key}` {}", t.location()),
                            span,
                            format!("expected a string, found {}", value_kind(value)),
                        )
                        .help(format!(
                            "every element of `{key}` is text in double quotes, e.g. `\"{raw}\"`"
                        )),
                    );
                }
            }
        }
        out
    }

    fn required_string(&mut self, t: &Tbl<'_>, key: &str) -> Option<Spanned<String>> {
        match self.string(t, key) {
            Lookup::Found(s) => Some(s),
            Lookup::Absent => {
                self.missing(t, key);
                None
            }
            Lookup::Invalid => None,
        }
    }

    fn required_array<'a>(&mut self, t: &Tbl<'a>, key: &str) -> Option<Spanned<&'a Array>> {
        match self.array(t, key) {
            Lookup::Found(s) => Some(s),
            Lookup::Absent => {
                self.missing(t, key);
                None
            }
            Lookup::Invalid => None,
        }
    }

    fn wrong_type<T>(
        &mut self,
        t: &Tbl<'_>,
        key: &str,
        item: &Item,
        span: Range<usize>,
        expected: Expected,
    ) -> Lookup<T> {
        let raw = self.source[span.clone()].trim().to_owned();
        let unquoted = item.as_str().map(str::trim);
        let help = match expected {
            Expected::Integer if unquoted.is_some_and(|s| s.parse::<i64>().is_ok()) => {
                format!(
                    "remove the quotes: `{key} = {}`",
                    unquoted.unwrap_or_default()
                )
            }
            Expected::Integer => format!("write a whole number, e.g. `{}`", example(key)),
            Expected::Boolean if matches!(unquoted, Some("true" | "false")) => {
                format!(
                    "remove the quotes: `{key} = {}`",
                    unquoted.unwrap_or_default()
                )
            }
            Expected::Boolean => format!("write `true` or `false`, e.g. `{}`", example(key)),
            Expected::String => format!("write text in double quotes, e.g. `{}`", example(key)),
            Expected::Array if item.is_str() => {
                format!("put it in brackets to make a list: `{key} = [{raw}]`")
            }
            Expected::Array => format!("write a list, e.g. `{}`", example(key)),
            Expected::Table if t.path.is_empty() && key == "environments" => {
                format!(
                    "define each environment as a table of its own, e.g.\n{}",
                    STARTER_ENV
                )
            }
            Expected::Table if t.path == "environments" => format!(
                "define each environment as a table, e.g.\n[environments.{key}]\n\
                 provider = \"local\""
            ),
            Expected::Table => format!("write it as a table: `[{}]`", t.child_path(key)),
        };
        self.push(
            Diagnostic::new(
                format!("wrong type for `{key}` {}", t.location()),
                span,
                format!("expected {}, found {}", expected.name(), item_kind(item)),
            )
            .help(help),
        );
        Lookup::Invalid
    }

    fn missing(&mut self, t: &Tbl<'_>, key: &str) {
        if self.was_suggested(t, key) {
            return;
        }
        let location = if t.path.is_empty() {
            String::new()
        } else {
            format!(" in `[{}]`", t.path)
        };
        self.push(
            Diagnostic::new(
                format!("missing `{key}`{location}"),
                t.span.clone(),
                format!("`{key}` is required here"),
            )
            .help(format!(
                "add `{key}` to this table, e.g. `{}`",
                example(key)
            )),
        );
    }

    fn unknown_keys(&mut self, t: &Tbl<'_>, allowed: &[&str]) {
        for (key, _) in t.inner.iter() {
            if !allowed.contains(&key) {
                self.unknown_key(t, key, allowed, None);
            }
        }
    }

    fn unknown_key(&mut self, t: &Tbl<'_>, key: &str, candidates: &[&str], help: Option<String>) {
        let help = help.unwrap_or_else(|| match closest(key, candidates.iter().copied()) {
            Some(s) => {
                self.suggested.insert((t.path.clone(), s.to_owned()));
                format!("did you mean `{s}`?")
            }
            None => format!(
                "the keys allowed here are {}",
                candidates
                    .iter()
                    .map(|c| format!("`{c}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        });
        self.push(
            Diagnostic::new(
                format!("unknown key `{key}` {}", t.location()),
                t.key_span(key),
                "unknown key",
            )
            .help(help),
        );
    }

    fn was_suggested(&self, t: &Tbl<'_>, key: &str) -> bool {
        self.suggested.contains(&(t.path.clone(), key.to_owned()))
    }
}

const STARTER_ENV: &str = "[environments.local]\nprovider = \"local\"";
const NO_ENVIRONMENTS_HELP: &str = "add at least one environment, e.g.\n\
                                    [environments.local]\n\
                                    provider = \"local\"";

fn min_above_max(
    t: &Tbl<'_>,
    min: &Option<Spanned<u32>>,
    max: &Option<Spanned<u32>>,
    min_v: u32,
    max_v: u32,
) -> Diagnostic {
    let path = &t.path;
    match (min, max) {
        (Some(min), Some(_)) => Diagnostic::new(
            format!("`min` ({min_v}) is greater than `max` ({max_v}) in `{path}`"),
            min.span.clone(),
            format!("greater than max = {max_v}"),
        )
        .help(format!(
            "lower `min` to at most {max_v}, or raise `max` to at least {min_v}"
        )),
        (Some(min), None) => Diagnostic::new(
            format!("`min` ({min_v}) is greater than `max` ({max_v}, the default) in `{path}`"),
            min.span.clone(),
            format!("greater than the default max = {max_v}"),
        )
        .help(format!(
            "add `max = {min_v}` (or more) to this table, or lower `min` to at most {max_v}"
        )),
        (None, Some(max)) => Diagnostic::new(
            format!("`max` ({max_v}) is less than `min` ({min_v}, the default) in `{path}`"),
            max.span.clone(),
            format!("less than the default min = {min_v}"),
        )
        .help(format!(
            "add `min = {max_v}` (or less) to this table, or raise `max` to at least {min_v}"
        )),
        (None, None) => unreachable!("the defaults have min <= max"),
    }
}

/// For a key that belongs in a sizing sub-table, the sub-tables it may go in.
fn sizing_table_of(key: &str) -> Option<fn(&str) -> String> {
    match key {
        "min" | "max" | "desired" => {
            Some(|env| format!("`[environments.{env}.web]` or `[environments.{env}.worker]`"))
        }
        "replicas" => Some(|env| format!("`[environments.{env}.database]`")),
        "shared_with_queue" => Some(|env| format!("`[environments.{env}.cache]`")),
        "instance_type" | "volume_size" => {
            Some(|env| format!("`[environments.{env}.web]`, `.worker`, `.database` or `.cache`"))
        }
        _ => None,
    }
}

/// An example line for `key`, used in help messages.
fn example(key: &str) -> &'static str {
    match key {
        "name" => "name = \"surveys\"",
        "app_path" => "app_path = \"app\"",
        "wsgi_module" => "wsgi_module = \"surveys.wsgi:application\"",
        "celery_app" => "celery_app = \"surveys\"",
        "domains" => "domains = [\"surveys.example.com\"]",
        "health_check_path" => "health_check_path = \"/healthcheck.html\"",
        "requirements" => "requirements = \"requirements.txt\"",
        "provider" => "provider = \"local\"",
        "http_port" => "http_port = 8080",
        "https_port" => "https_port = 8443",
        "addresses" => "addresses = \"127.77.0.0/16\"",
        "region" => "region = \"eu-west-1\"",
        "ami" => "ami = \"ami-0123456789abcdef0\"",
        "load_balancer" => "load_balancer = \"classic\"",
        "certificate" => {
            "certificate = \"arn:aws:acm:eu-west-1:123456789012:certificate/0a1b2c3d-...\""
        }
        "admin_cidrs" => "admin_cidrs = [\"203.0.113.0/24\"]",
        "vpc" => "vpc = \"vpc-0a1b2c3d4e5f67890\"",
        "subnets" => "subnets = [\"subnet-0a1b2c3d\", \"subnet-4e5f6a7b\"]",
        "key_pair" => "key_pair = \"admin\"",
        "admin_public_key" => "admin_public_key = \"ssh-ed25519 AAAAC3Nza... you@host\"",
        "instance_profile" => "instance_profile = \"surveys-servers\"",
        "cpu_target" => "cpu_target = 50",
        "launch" => "launch = \"template\"",
        "deploy_user" => "deploy_user = \"admin\"",
        "ssh_identity" => "ssh_identity = \"keys/production\"",
        "bastion" => "bastion = \"admin@bastion.example.com\"",
        "ssh_port" => "ssh_port = 22",
        "min" => "min = 2",
        "max" => "max = 4",
        "desired" => "desired = 2",
        "instance_type" => "instance_type = \"t3.small\"",
        "volume_size" => "volume_size = 20",
        "replicas" => "replicas = 1",
        "shared_with_queue" => "shared_with_queue = true",
        "hsts_max_age" => "hsts_max_age = 31536000",
        "hsts_include_subdomains" => "hsts_include_subdomains = true",
        _ => "key = \"value\"",
    }
}

fn item_kind(item: &Item) -> &'static str {
    match item {
        Item::None => "nothing",
        Item::Value(v) => value_kind(v),
        Item::Table(_) => "a table",
        Item::ArrayOfTables(_) => "an array of tables",
    }
}

fn value_kind(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date-time",
        Value::Array(_) => "an array",
        Value::InlineTable(_) => "a table",
    }
}

fn value_or_default(s: Option<Spanned<String>>) -> String {
    s.map(|s| s.value).unwrap_or_default()
}

fn placeholder_project() -> Project {
    Project {
        name: String::new(),
        app_path: PathBuf::new(),
        wsgi_module: String::new(),
        celery_app: String::new(),
        domains: Vec::new(),
        health_check_path: String::new(),
        requirements: PathBuf::new(),
    }
}

fn placeholder_local() -> LocalConfig {
    LocalConfig {
        http_port: defaults::HTTP_PORT,
        https_port: defaults::HTTPS_PORT,
        addresses: defaults::local_addresses(),
    }
}
