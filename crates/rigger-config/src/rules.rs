//! The rules single values must follow: names, domains, Python paths, AWS identifiers.
//!
//! Pure predicates over strings, kept apart from the document walk in `validate.rs` so each rule
//! is easy to find and to test on its own.

/// `^[a-z][a-z0-9-]{0,30}$`
pub(crate) fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && s.len() <= 31
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A best guess at the valid name the user meant: `My_Site` → `my-site`.
pub(crate) fn fix_name(s: &str) -> String {
    let lower: String = s
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    lower
        .trim_start_matches(|c: char| !c.is_ascii_lowercase())
        .chars()
        .take(31)
        .collect()
}

pub(crate) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub(crate) fn is_dotted_path(s: &str) -> bool {
    s.split('.').all(is_identifier)
}

/// Ok, or a help line saying how to fix the domain.
pub(crate) fn check_domain(d: &str) -> Result<(), String> {
    const RULES: &str = "a domain is labels of letters, digits and `-` separated by dots, \
                         optionally with a leading `.` to include all subdomains";
    if let Some((_, rest)) = d.split_once("://") {
        let host = rest.split(['/', ':']).next().unwrap_or_default();
        return Err(format!(
            "give the host name only, without scheme or path: `\"{host}\"`"
        ));
    }
    if let Some(rest) = d.strip_prefix("*.") {
        return Err(format!(
            "write `\".{rest}\"` to match `{rest}` and all its subdomains"
        ));
    }
    if let Some((host, _)) = d.split_once(['/', ':']) {
        return Err(format!(
            "give the host name only, without port or path: `\"{host}\"`"
        ));
    }
    let name = d.strip_prefix('.').unwrap_or(d);
    let labels_ok = name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        });
    if labels_ok {
        return Ok(());
    }
    let lower = d.to_ascii_lowercase();
    if lower != d && check_domain(&lower).is_ok() {
        return Err(format!("write it in lower case: `\"{lower}\"`"));
    }
    if let Some(trimmed) = d.strip_suffix('.')
        && check_domain(trimmed).is_ok()
    {
        return Err(format!("remove the trailing dot: `\"{trimmed}\"`"));
    }
    Err(RULES.to_owned())
}

/// `us-east-1`, `eu-central-2`, `us-gov-west-1`.
pub(crate) fn is_region(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase()))
        && parts[parts.len() - 1].chars().all(|c| c.is_ascii_digit())
        && !parts[parts.len() - 1].is_empty()
}

/// `^ami-[0-9a-f]{8,17}$`
pub(crate) fn is_ami(s: &str) -> bool {
    s.strip_prefix("ami-").is_some_and(|hex| {
        (8..=17).contains(&hex.len())
            && hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// `<prefix>-` followed by 8 to 17 lower-case hex digits: `vpc-0a1b2c3d`, `subnet-...`.
pub(crate) fn is_aws_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('-'))
        .is_some_and(|hex| {
            (8..=17).contains(&hex.len())
                && hex
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        })
}

/// An EC2 key pair name as rigger accepts it: 1 to 255 of letters, digits, `.`, `_` and `-`.
/// EC2 allows more, but the name is printed in plans and messages and handed to tools, so
/// rigger keeps to characters that mean nothing to a shell or a terminal.
pub(crate) fn is_key_pair_name(s: &str) -> bool {
    (1..=255).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// An IAM instance profile name: 1 to 128 of letters, digits and `+=,.@_-`.
pub(crate) fn is_instance_profile_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-".contains(c))
}

/// A unix user name as Debian's `adduser` accepts it: `^[a-z_][a-z0-9_-]{0,31}$`.
pub(crate) fn is_unix_user(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && s.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Why a text is not `user@host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BastionProblem {
    /// `ssh://...`: a URL.
    Scheme,
    /// No `user@`.
    NoUser,
    /// The part before `@` is not a unix user name.
    User(String),
    /// The host is neither a DNS name nor an IP address.
    Host(String),
    /// What follows the last `:` is not a port from 1 to 65535.
    Port(String),
}

/// `user@host[:port]` (an IPv6 host in brackets: `user@[2001:db8::1]:2222`) as user, host
/// (without brackets) and port (default 22).
pub(crate) fn parse_bastion(s: &str) -> Result<(String, String, u16), BastionProblem> {
    if s.contains("://") {
        return Err(BastionProblem::Scheme);
    }
    let Some((user, address)) = s.rsplit_once('@') else {
        return Err(BastionProblem::NoUser);
    };
    if !is_unix_user(user) {
        return Err(BastionProblem::User(user.to_owned()));
    }
    let (host, port) = if let Some(rest) = address.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| BastionProblem::Host(address.to_owned()))?;
        if host.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(BastionProblem::Host(address.to_owned()));
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err(BastionProblem::Host(address.to_owned())),
            },
        }
    } else {
        match address.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (address, None),
        }
    };
    let is_dns = host.len() <= 253
        && host.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !is_dns && host.parse::<std::net::IpAddr>().is_err() {
        return Err(BastionProblem::Host(host.to_owned()));
    }
    let port = match port {
        None => 22,
        Some(text) => text
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| BastionProblem::Port(text.to_owned()))?,
    };
    Ok((user.to_owned(), host.to_owned(), port))
}

/// Why a text is not an OpenSSH public key EC2 can import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PublicKeyProblem {
    PrivateKey,
    Path,
    UnsupportedType,
    NotAKey,
    Damaged,
}

/// The key as `type base64` (the comment dropped), or why it is not one: EC2 imports
/// `ssh-ed25519` and `ssh-rsa` keys.
pub(crate) fn parse_public_key(s: &str) -> Result<String, PublicKeyProblem> {
    let s = s.trim();
    if s.contains("PRIVATE KEY") {
        return Err(PublicKeyProblem::PrivateKey);
    }
    let mut fields = s.split_whitespace();
    let kind = fields.next().unwrap_or_default();
    let data = fields.next();
    if data.is_none() && (kind.starts_with(['/', '~', '.']) || kind.ends_with(".pub")) {
        return Err(PublicKeyProblem::Path);
    }
    // The base64 of the key type's length-prefixed name, which every key's data starts with.
    let header = match kind {
        "ssh-ed25519" => "AAAAC3NzaC1lZDI1NTE5",
        "ssh-rsa" => "AAAAB3NzaC1yc2E",
        "ssh-dss" => return Err(PublicKeyProblem::UnsupportedType),
        k if k.starts_with("ecdsa-") || k.starts_with("sk-") => {
            return Err(PublicKeyProblem::UnsupportedType);
        }
        _ => return Err(PublicKeyProblem::NotAKey),
    };
    let data = data.ok_or(PublicKeyProblem::Damaged)?;
    let base64 = data
        .trim_end_matches('=')
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/');
    if !base64 || !data.starts_with(header) || data.len() % 4 != 0 || data.len() < 60 {
        return Err(PublicKeyProblem::Damaged);
    }
    Ok(format!("{kind} {data}"))
}

/// Why a text is not a relative path rigger accepts (`app_path`, `requirements`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelativePathProblem {
    Empty,
    /// Starts with `/` or `~`.
    Absolute,
    /// Has a `..` component: it would leave the directory it is relative to.
    Parent,
    /// A component starts with `-`, which a command would read as an option.
    Dash,
    /// A character outside letters, digits, `.`, `_`, `-` and `/`.
    Character(char),
    TooLong,
}

/// The longest path, URL path or ARN rigger accepts.
pub(crate) const MAX_PATH_LENGTH: usize = 255;

/// A path below the directory it is relative to: components of letters, digits, `.`, `_`
/// and `-` (not `..`, not starting with `-`) separated by `/`. Such a path stays inside that
/// directory and means the same to every shell, template and tool it reaches.
pub(crate) fn check_relative_path(s: &str) -> Result<(), RelativePathProblem> {
    if s.is_empty() {
        return Err(RelativePathProblem::Empty);
    }
    if s.starts_with(['/', '~']) {
        return Err(RelativePathProblem::Absolute);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-/".contains(*c)))
    {
        return Err(RelativePathProblem::Character(c));
    }
    if s.split('/').any(|part| part == "..") {
        return Err(RelativePathProblem::Parent);
    }
    if s.split('/').any(|part| part.starts_with('-')) {
        return Err(RelativePathProblem::Dash);
    }
    if s.len() > MAX_PATH_LENGTH {
        return Err(RelativePathProblem::TooLong);
    }
    Ok(())
}

/// Why a text is not a health check path rigger accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UrlPathProblem {
    /// Does not start with `/`.
    Relative,
    /// A character outside letters, digits, `.`, `_`, `-` and `/`.
    Character(char),
    /// Has a `..` segment.
    Parent,
    TooLong,
}

/// An absolute URL path of letters, digits, `.`, `_`, `-` and `/`, without `..` segments:
/// it reaches the load balancer, nginx's configuration and shell lines on the servers, so
/// nothing in it may mean anything to them (no query string, no escapes, no quotes).
pub(crate) fn check_url_path(s: &str) -> Result<(), UrlPathProblem> {
    if !s.starts_with('/') {
        return Err(UrlPathProblem::Relative);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-/".contains(*c)))
    {
        return Err(UrlPathProblem::Character(c));
    }
    if s.split('/').any(|segment| segment == "..") {
        return Err(UrlPathProblem::Parent);
    }
    if s.len() > MAX_PATH_LENGTH {
        return Err(UrlPathProblem::TooLong);
    }
    Ok(())
}

/// Why a text is not the ARN of a server certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CertificateProblem {
    /// Not `arn:PARTITION:SERVICE:REGION:ACCOUNT:RESOURCE` at all.
    NotArn,
    /// An ARN, but not of an ACM certificate or an IAM server certificate.
    NotCertificate,
    /// An ACM ARN whose region is not a region code.
    Region,
    /// The account is not 12 digits.
    Account,
    /// The certificate's id or name has a character outside its grammar.
    Character(char),
    TooLong,
}

/// A server certificate's ARN: `arn:aws[-...]:acm:REGION:ACCOUNT:certificate/ID` (ACM; `ID` of
/// letters, digits and `-`) or `arn:aws[-...]:iam::ACCOUNT:server-certificate/[PATH/]NAME`
/// (IAM; letters, digits and `+=,.@_-/`), `ACCOUNT` being 12 digits. Returns the region of an
/// ACM certificate, which must be the environment's.
pub(crate) fn check_certificate_arn(s: &str) -> Result<Option<&str>, CertificateProblem> {
    let parts: Vec<&str> = s.splitn(6, ':').collect();
    let [arn, partition, service, region, account, resource] = parts[..] else {
        return Err(CertificateProblem::NotArn);
    };
    let partition_ok = partition == "aws"
        || partition.strip_prefix("aws-").is_some_and(|rest| {
            !rest.is_empty() && rest.chars().all(|c| c.is_ascii_lowercase() || c == '-')
        });
    if arn != "arn" || !partition_ok {
        return Err(CertificateProblem::NotArn);
    }
    if s.len() > MAX_PATH_LENGTH * 2 {
        return Err(CertificateProblem::TooLong);
    }
    let (id, allowed, region): (&str, &str, Option<&str>) = match service {
        "acm" => {
            let Some(id) = resource.strip_prefix("certificate/") else {
                return Err(CertificateProblem::NotCertificate);
            };
            if !is_region(region) {
                return Err(CertificateProblem::Region);
            }
            (id, "-", Some(region))
        }
        "iam" => {
            let Some(id) = resource.strip_prefix("server-certificate/") else {
                return Err(CertificateProblem::NotCertificate);
            };
            if !region.is_empty() {
                return Err(CertificateProblem::Region);
            }
            (id, "+=,.@_-/", None)
        }
        _ => return Err(CertificateProblem::NotCertificate),
    };
    if account.len() != 12 || !account.chars().all(|c| c.is_ascii_digit()) {
        return Err(CertificateProblem::Account);
    }
    if id.is_empty() {
        return Err(CertificateProblem::NotCertificate);
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || allowed.contains(*c)))
    {
        return Err(CertificateProblem::Character(c));
    }
    Ok(region)
}

/// A character as a message quotes it: in backticks, a control character as its escape
/// (`\n`, `\u{1b}`), which would otherwise break the line or drive the terminal, and a space
/// or a backtick by name.
pub(crate) fn shown(c: char) -> String {
    match c {
        ' ' => "a space".to_owned(),
        '`' => "a backtick".to_owned(),
        c if c.is_control() => format!("`{}`", c.escape_default()),
        c => format!("`{c}`"),
    }
}

/// `family.size`, e.g. `t3.small`, `m7g.2xlarge`, `u-6tb1.metal`.
pub(crate) fn is_instance_type(s: &str) -> bool {
    s.split_once('.').is_some_and(|(family, size)| {
        family
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase())
            && family
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !size.is_empty()
            && size
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_name("surveys"));
        assert!(is_name("a"));
        assert!(is_name("prod-2"));
        assert!(is_name(&"a".repeat(31)));
        assert!(!is_name(&"a".repeat(32)));
        assert!(!is_name("2prod"));
        assert!(!is_name("Prod"));
        assert!(!is_name("my_site"));
        assert!(!is_name(""));
        assert_eq!(fix_name("My_Site"), "my-site");
        assert_eq!(fix_name("2nd site"), "nd-site");
    }

    #[test]
    fn domains() {
        assert_eq!(check_domain("surveys.example.com"), Ok(()));
        assert_eq!(check_domain(".example.org"), Ok(()));
        assert_eq!(check_domain("localhost"), Ok(()));
        assert_eq!(check_domain("xn--bcher-kva.example"), Ok(()));
        assert!(check_domain("").is_err());
        assert!(check_domain(".").is_err());
        assert!(check_domain("a..b").is_err());
        assert!(check_domain("-a.com").is_err());
        assert!(check_domain("a_b.com").is_err());
        assert!(check_domain(&format!("{}.com", "a".repeat(64))).is_err());
        assert!(
            check_domain("https://x.com/")
                .unwrap_err()
                .contains("`\"x.com\"`")
        );
        assert!(
            check_domain("*.x.com")
                .unwrap_err()
                .contains("`\".x.com\"`")
        );
        assert!(check_domain("X.com").unwrap_err().contains("lower case"));
        assert!(check_domain("x.com.").unwrap_err().contains("trailing dot"));
        assert!(check_domain("x.com:8080").unwrap_err().contains("port"));
    }

    #[test]
    fn python_paths() {
        assert!(is_dotted_path("surveys.wsgi"));
        assert!(is_dotted_path("_private"));
        assert!(!is_dotted_path("surveys/wsgi.py"));
        assert!(!is_dotted_path("surveys..wsgi"));
        assert!(!is_dotted_path(""));
        assert!(is_identifier("application"));
        assert!(!is_identifier("1app"));
    }

    #[test]
    fn aws_ids() {
        assert!(is_region("eu-west-1"));
        assert!(is_region("us-gov-west-1"));
        assert!(is_region("ap-southeast-5"));
        assert!(!is_region("eu-west"));
        assert!(!is_region("EU-west-1"));
        assert!(!is_region("europe-west-1"));
        assert!(is_ami("ami-12345678"));
        assert!(is_ami("ami-0123456789abcdef0"));
        assert!(!is_ami("ami-1234567"));
        assert!(!is_ami("ami-0123456789ABCDEF0"));
        assert!(!is_ami("0123456789abcdef0"));
        assert!(is_instance_type("t3.small"));
        assert!(is_instance_type("m7g.2xlarge"));
        assert!(is_instance_type("u-6tb1.metal"));
        assert!(!is_instance_type("t3small"));
        assert!(!is_instance_type("T3.small"));
        assert!(!is_instance_type("t3."));
        assert!(is_aws_id("vpc-0a1b2c3d", "vpc"));
        assert!(is_aws_id("subnet-0123456789abcdef0", "subnet"));
        assert!(!is_aws_id("subnet-0a1b2c3d", "vpc"));
        assert!(!is_aws_id("vpc-main", "vpc"));
        assert!(is_key_pair_name("admin_key-2.old"));
        assert!(!is_key_pair_name("admin key"));
        assert!(!is_key_pair_name("admin;reboot"));
        assert!(!is_key_pair_name("$(id)"));
        assert!(!is_key_pair_name(&"a".repeat(256)));
        assert!(!is_key_pair_name(""));
        assert!(is_instance_profile_name("shop-prod+web@x.y_z"));
        assert!(!is_instance_profile_name(
            "arn:aws:iam::1:instance-profile/x"
        ));
    }

    #[test]
    fn relative_paths() {
        for ok in [
            "app",
            ".",
            "src/site",
            "requirements/production.txt",
            "app/",
            "a_b-c.d",
        ] {
            assert_eq!(check_relative_path(ok), Ok(()), "{ok}");
        }
        use RelativePathProblem as P;
        assert_eq!(check_relative_path(""), Err(P::Empty));
        assert_eq!(check_relative_path("/srv/app"), Err(P::Absolute));
        assert_eq!(check_relative_path("~/app"), Err(P::Absolute));
        assert_eq!(check_relative_path("../../etc"), Err(P::Parent));
        assert_eq!(check_relative_path("app/.."), Err(P::Parent));
        assert_eq!(check_relative_path("$(id)"), Err(P::Character('$')));
        assert_eq!(check_relative_path("a\nb"), Err(P::Character('\n')));
        assert_eq!(check_relative_path("a\\b"), Err(P::Character('\\')));
        assert_eq!(check_relative_path("my app"), Err(P::Character(' ')));
        assert_eq!(check_relative_path("-r"), Err(P::Dash));
        assert_eq!(check_relative_path("x/--help"), Err(P::Dash));
        assert_eq!(check_relative_path(&"a".repeat(256)), Err(P::TooLong));
    }

    #[test]
    fn url_paths() {
        for ok in [
            "/",
            "/healthcheck.html",
            "/health/check-1_x",
            "/.well-known/h",
        ] {
            assert_eq!(check_url_path(ok), Ok(()), "{ok}");
        }
        use UrlPathProblem as P;
        assert_eq!(check_url_path("health"), Err(P::Relative));
        assert_eq!(
            check_url_path("/$(touch${IFS}/tmp/pwned)"),
            Err(P::Character('$'))
        );
        assert_eq!(check_url_path("/h?x=1"), Err(P::Character('?')));
        assert_eq!(check_url_path("/a\"b"), Err(P::Character('"')));
        assert_eq!(check_url_path("/a/../b"), Err(P::Parent));
        assert_eq!(
            check_url_path(&format!("/{}", "a".repeat(255))),
            Err(P::TooLong)
        );
    }

    #[test]
    fn certificate_arns() {
        assert_eq!(
            check_certificate_arn(
                "arn:aws:acm:eu-west-1:123456789012:certificate/0a1b2c3d-4e5f-6789-abcd-ef0123456789"
            ),
            Ok(Some("eu-west-1"))
        );
        assert_eq!(
            check_certificate_arn("arn:aws-us-gov:acm:us-gov-west-1:123456789012:certificate/x1"),
            Ok(Some("us-gov-west-1"))
        );
        assert_eq!(
            check_certificate_arn("arn:aws:iam::123456789012:server-certificate/prod/site+2024@x"),
            Ok(None)
        );
        use CertificateProblem as P;
        assert_eq!(check_certificate_arn("my-cert"), Err(P::NotArn));
        assert_eq!(
            check_certificate_arn("arn:gcp:acm:eu-west-1:1:certificate/x"),
            Err(P::NotArn)
        );
        assert_eq!(
            check_certificate_arn("arn:aws:s3:::bucket/certificate/x:y"),
            Err(P::NotCertificate)
        );
        assert_eq!(
            check_certificate_arn("arn:aws:acm:europe:123456789012:certificate/x"),
            Err(P::Region)
        );
        assert_eq!(
            check_certificate_arn("arn:aws:acm:eu-west-1:1234:certificate/x"),
            Err(P::Account)
        );
        assert_eq!(
            check_certificate_arn("arn:aws:acm:eu-west-1:123456789012:certificate/x;reboot"),
            Err(P::Character(';'))
        );
        assert_eq!(
            check_certificate_arn("arn:aws:acm:eu-west-1:123456789012:certificate/$(id)"),
            Err(P::Character('$'))
        );
        assert_eq!(
            check_certificate_arn("arn:aws:iam::123456789012:server-certificate/a b"),
            Err(P::Character(' '))
        );
    }

    #[test]
    fn control_characters_are_shown_escaped() {
        assert_eq!(shown('$'), "`$`");
        assert_eq!(shown('`'), "a backtick");
        assert_eq!(shown('\n'), "`\\n`");
        assert_eq!(shown('\u{1b}'), "`\\u{1b}`");
    }

    #[test]
    fn unix_users() {
        assert!(is_unix_user("admin"));
        assert!(is_unix_user("_deploy-2"));
        assert!(!is_unix_user("Admin"));
        assert!(!is_unix_user("2admin"));
        assert!(!is_unix_user("ad min"));
        assert!(!is_unix_user(""));
        assert!(!is_unix_user(&"a".repeat(33)));
    }

    #[test]
    fn bastions() {
        let ok = |user: &str, host: &str, port| Ok((user.to_owned(), host.to_owned(), port));
        assert_eq!(
            parse_bastion("admin@bastion.example.com"),
            ok("admin", "bastion.example.com", 22)
        );
        assert_eq!(
            parse_bastion("ops@203.0.113.5:2222"),
            ok("ops", "203.0.113.5", 2222)
        );
        assert_eq!(
            parse_bastion("ops@[2001:db8::1]:2200"),
            ok("ops", "2001:db8::1", 2200)
        );
        assert_eq!(
            parse_bastion("ops@[2001:db8::1]"),
            ok("ops", "2001:db8::1", 22)
        );
        assert_eq!(
            parse_bastion("ssh://ops@bastion"),
            Err(BastionProblem::Scheme)
        );
        assert_eq!(parse_bastion("bastion"), Err(BastionProblem::NoUser));
        assert_eq!(
            parse_bastion("Ops@bastion"),
            Err(BastionProblem::User("Ops".into()))
        );
        assert_eq!(
            parse_bastion("ops@bad_host"),
            Err(BastionProblem::Host("bad_host".into()))
        );
        assert_eq!(
            parse_bastion("ops@bastion:0"),
            Err(BastionProblem::Port("0".into()))
        );
        assert_eq!(
            parse_bastion("ops@bastion:ssh"),
            Err(BastionProblem::Port("ssh".into()))
        );
    }

    #[test]
    fn public_keys() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKK/sm27G6/bj9AG/ngQW2cXpMyMrTiYf52VXj7dZ3up";
        assert_eq!(
            parse_public_key(&format!("{key} me@host\n")),
            Ok(key.to_owned())
        );
        assert_eq!(
            parse_public_key("-----BEGIN OPENSSH PRIVATE KEY-----"),
            Err(PublicKeyProblem::PrivateKey)
        );
        assert_eq!(
            parse_public_key("~/.ssh/id_ed25519.pub"),
            Err(PublicKeyProblem::Path)
        );
        assert_eq!(
            parse_public_key("ecdsa-sha2-nistp256 AAAAE2VjZHNh"),
            Err(PublicKeyProblem::UnsupportedType)
        );
        assert_eq!(parse_public_key("hello"), Err(PublicKeyProblem::NotAKey));
        assert_eq!(
            parse_public_key("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA"),
            Err(PublicKeyProblem::Damaged)
        );
    }
}
