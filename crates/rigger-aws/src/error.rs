//! Errors of the AWS provider: every failed call names the operation and the resource, says
//! what kind of failure it was (credentials, permissions, a limit, a missing image...) and
//! what the user can do about it. [`Context::op`] turns an SDK result into one.

use std::fmt;

use aws_sdk_ec2::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

/// What kind of failure, as far as rigger can tell from the service's error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// No credentials could be loaded, or they were rejected.
    Credentials,
    /// The credentials lack a permission.
    AccessDenied,
    /// An account or service quota was reached.
    Limit,
    /// The configured machine image does not exist in the region.
    MissingImage,
    /// The resource does not exist (often handled by the caller).
    NotFound,
    /// The resource is still in use by another one (retried for security groups).
    DependencyViolation,
    /// The service or the network could not be reached.
    Unreachable,
    Other,
}

impl ErrorKind {
    /// What the user can do next.
    pub fn hint(self) -> &'static str {
        match self {
            ErrorKind::Credentials => {
                "configure AWS credentials: AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, `aws configure`, `aws sso login`, or an instance role"
            }
            ErrorKind::AccessDenied => {
                "grant this identity the permission named above (see docs/aws.md for the policy rigger needs)"
            }
            ErrorKind::Limit => {
                "a quota was reached: delete unused resources or request an increase in the Service Quotas console, then run the command again"
            }
            ErrorKind::MissingImage => {
                "check `ami` in rigger.toml: the image must exist in the environment's region and be visible to this account"
            }
            ErrorKind::NotFound => {
                "the resource may have been deleted outside rigger; run `rigger plan` again"
            }
            ErrorKind::DependencyViolation => {
                "another resource still uses it; wait a minute (load balancers release their network interfaces slowly) and run the command again"
            }
            ErrorKind::Unreachable => {
                "check the network, the region, and --endpoint-url / AWS_ENDPOINT_URL if you use one"
            }
            ErrorKind::Other => {
                "run the command again with -v for details; an interrupted `up` converges when re-run"
            }
        }
    }

    fn from_code(code: &str) -> ErrorKind {
        let lower = code.to_ascii_lowercase();
        if code.starts_with("InvalidAMIID") {
            ErrorKind::MissingImage
        } else if matches!(
            code,
            "AuthFailure"
                | "UnrecognizedClientException"
                | "InvalidClientTokenId"
                | "SignatureDoesNotMatch"
                | "ExpiredToken"
                | "ExpiredTokenException"
                | "MissingAuthenticationToken"
        ) {
            ErrorKind::Credentials
        } else if code == "UnauthorizedOperation"
            || lower.starts_with("accessdenied")
            || code == "Unauthorized"
        {
            ErrorKind::AccessDenied
        } else if lower.contains("limitexceeded")
            || lower.contains("quotaexceeded")
            || lower.starts_with("toomany")
            || code == "InstanceLimitExceeded"
            || code == "VcpuLimitExceeded"
        {
            ErrorKind::Limit
        } else if code == "DependencyViolation"
            || code.ends_with("InUse")
            || code == "ResourceInUse"
            || code == "DeleteConflict"
        {
            ErrorKind::DependencyViolation
        } else if lower.contains("notfound")
            || lower.contains("not.found")
            || code == "NoSuchEntity"
        {
            ErrorKind::NotFound
        } else {
            ErrorKind::Other
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failed AWS operation.
#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("{operation} {resource} failed: {problem}\n  help: {}", kind.hint())]
    Call {
        operation: &'static str,
        resource: String,
        kind: ErrorKind,
        /// The service's error code and message (never a secret: rigger sends secrets only
        /// as SSM parameter values, which errors do not echo).
        problem: String,
        /// The service's error code alone (`EntityAlreadyExists`), when it sent one.
        code: Option<String>,
        #[source]
        source: BoxError,
    },
    #[error("{operation} {resource}: {problem}\n  help: {help}")]
    Precondition {
        operation: &'static str,
        resource: String,
        problem: String,
        help: String,
    },
    #[error("timed out after {seconds} s waiting for {what}")]
    Timeout { what: String, seconds: u64 },
}

impl AwsError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            AwsError::Call { kind, .. } => *kind,
            AwsError::Precondition { .. } | AwsError::Timeout { .. } => ErrorKind::Other,
        }
    }

    /// The service's error code, for the few errors a caller handles by code.
    pub fn code(&self) -> Option<&str> {
        match self {
            AwsError::Call { code, .. } => code.as_deref(),
            AwsError::Precondition { .. } | AwsError::Timeout { .. } => None,
        }
    }

    pub(crate) fn precondition(
        operation: &'static str,
        resource: impl Into<String>,
        problem: impl Into<String>,
        help: impl Into<String>,
    ) -> AwsError {
        AwsError::Precondition {
            operation,
            resource: resource.into(),
            problem: problem.into(),
            help: help.into(),
        }
    }
}

/// Names the operation and the resource of an SDK call's error.
pub(crate) trait Context<T> {
    fn op(self, operation: &'static str, resource: impl fmt::Display) -> Result<T, AwsError>;
}

impl<T, E, R> Context<T> for Result<T, SdkError<E, R>>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    fn op(self, operation: &'static str, resource: impl fmt::Display) -> Result<T, AwsError> {
        self.map_err(|error| classify(operation, resource.to_string(), error))
    }
}

fn classify<E, R>(operation: &'static str, resource: String, error: SdkError<E, R>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: fmt::Debug + Send + Sync + 'static,
{
    let (kind, problem) = match (&error, error.code()) {
        (_, Some(code)) => (
            ErrorKind::from_code(code),
            match error.message() {
                Some(message) => format!("{code}: {message}"),
                None => code.to_owned(),
            },
        ),
        (SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_), None) => {
            let text = DisplayErrorContext(&error).to_string();
            if text.contains("credential") {
                (
                    ErrorKind::Credentials,
                    "no AWS credentials could be loaded".to_owned(),
                )
            } else {
                (
                    ErrorKind::Unreachable,
                    "the service could not be reached".to_owned(),
                )
            }
        }
        (SdkError::TimeoutError(_), None) => {
            (ErrorKind::Unreachable, "the call timed out".to_owned())
        }
        (SdkError::ResponseError(_), None) => (
            ErrorKind::Other,
            "the service's answer could not be read".to_owned(),
        ),
        (_, None) => (
            ErrorKind::Other,
            "the service answered with an error".to_owned(),
        ),
    };
    AwsError::Call {
        operation,
        resource,
        kind,
        problem,
        code: error.code().map(str::to_owned),
        source: Box::new(error),
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorKind;

    #[test]
    fn error_codes_are_sorted_by_who_can_fix_them() {
        for (code, kind) in [
            ("InvalidAMIID.NotFound", ErrorKind::MissingImage),
            ("InvalidAMIID.Malformed", ErrorKind::MissingImage),
            ("AuthFailure", ErrorKind::Credentials),
            ("UnauthorizedOperation", ErrorKind::AccessDenied),
            ("AccessDenied", ErrorKind::AccessDenied),
            ("AccessDeniedException", ErrorKind::AccessDenied),
            ("InstanceLimitExceeded", ErrorKind::Limit),
            ("LimitExceeded", ErrorKind::Limit),
            ("TooManyLoadBalancers", ErrorKind::Limit),
            ("DependencyViolation", ErrorKind::DependencyViolation),
            (
                "InvalidNetworkInterface.InUse",
                ErrorKind::DependencyViolation,
            ),
            ("InvalidGroup.NotFound", ErrorKind::NotFound),
            ("LoadBalancerNotFound", ErrorKind::NotFound),
            ("NoSuchEntity", ErrorKind::NotFound),
            ("InvalidKeyPair.NotFound", ErrorKind::NotFound),
            ("DeleteConflict", ErrorKind::DependencyViolation),
            ("ValidationError", ErrorKind::Other),
        ] {
            assert_eq!(ErrorKind::from_code(code), kind, "{code}");
        }
    }
}
