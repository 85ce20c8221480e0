//! The commented `rigger.toml` that `rigger init` writes.
//!
//! It sets every required key, shows optional ones commented out at their defaults, and
//! carries a commented-out AWS environment to copy from. Tests parse it, with and without
//! that AWS block uncommented, so it can never fall out of step with the validator.

/// A starter `rigger.toml` for a project called `project_name`, which should be a valid project
/// name (`^[a-z][a-z0-9-]{0,30}$`); other names give a file that fails to load with an error
/// pointing at the name. Python identifiers are derived by replacing `-` with `_`.
pub fn starter(project_name: &str) -> String {
    let module = project_name.replace('-', "_");
    format!(
        r#"# rigger.toml: what to deploy ([project]) and where ([environments.NAME]).
# Every key, its type and its default are described in rigger's docs/config.md.

[project]
# Lower-case letters, digits and "-", starting with a letter; prefixes every resource name.
name = "{project_name}"
# The directory holding manage.py, relative to this file.
app_path = "."
# gunicorn's WSGI callable, "module.path:attribute".
wsgi_module = "{module}.wsgi:application"
# The Celery application, as given to `celery -A`.
celery_app = "{module}"
# The site's domains, canonical one first; a leading "." also matches every subdomain.
domains = ["{project_name}.example.com"]
# The path the load balancer probes; it must answer 200 only when the app is healthy.
# health_check_path = "/healthcheck.html"
# pip requirements, relative to app_path.
# requirements = "requirements.txt"

# The whole architecture on this machine: load balancer on http://127.77.0.1:8080, two web
# servers, one worker, a cache/queue server and PostgreSQL with one streaming replica.
[environments.local]
provider = "local"
# http_port = 8080
# https_port = 8443
# addresses = "127.77.0.0/16"    # loopback block the servers take their addresses from
# No HSTS here: browsers would remember it for this machine's addresses and rigger's local CA.

[environments.local.web]
min = 2
max = 4
desired = 2

[environments.local.worker]
min = 1
max = 1
desired = 1

[environments.local.database]
replicas = 1

# An environment on AWS: uncomment, then fill in your region, AMI and certificate.
# [environments.production]
# provider = "aws"
# region = "eu-west-1"
# ami = "ami-0123456789abcdef0"    # a Debian 12 image of that region (its login user is `admin`)
# certificate = "arn:aws:acm:eu-west-1:123456789012:certificate/00000000-0000-0000-0000-000000000000"
# admin_cidrs = ["203.0.113.0/24"]    # who may SSH in; leave out to keep SSH closed
# admin_public_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl admin@example"
# ssh_identity = "~/.ssh/id_ed25519"    # its private key, for `rigger exec/ssh/logs`
# bastion = "admin@203.0.113.10"      # when servers have no public address
# hsts_max_age = 31536000    # HSTS for a year, once the domains are on HTTPS for good
#
# [environments.production.web]
# min = 2
# max = 8
# desired = 2
# instance_type = "t3.small"
#
# [environments.production.database]
# replicas = 1
# instance_type = "m5.large"
# volume_size = 100
"#
    )
}
