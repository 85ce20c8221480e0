//! IAM's policy language as rigger speaks it: the inline policy of an instance role written
//! from the topology's permission lines, and read back into them. Pure functions.

use std::collections::BTreeSet;

use serde_json::{Value as Json, json};

/// The AWS partition of a region, for ARNs.
fn partition(region: &str) -> &'static str {
    if region.starts_with("cn-") {
        "aws-cn"
    } else if region.starts_with("us-gov-") {
        "aws-us-gov"
    } else {
        "aws"
    }
}

/// The inline policy allowing `permissions`: `ACTION /ssm/parameter/path` on that path's
/// parameters in `region`, `ACTION via SERVICE` on any key, but only through that service,
/// `ACTION s3:::bucket/key` on those S3 objects.
pub fn policy_document(permissions: &BTreeSet<String>, region: &str) -> String {
    let statements: Vec<Json> = permissions
        .iter()
        .filter_map(|line| {
            let (action, target) = line.split_once(' ')?;
            if target.starts_with("s3:::") {
                return Some(json!({
                    "Effect": "Allow",
                    "Action": action,
                    "Resource": format!("arn:{}:{target}", partition(region)),
                }));
            }
            Some(match target.strip_prefix("via ") {
                Some(service) => json!({
                    "Effect": "Allow",
                    "Action": action,
                    "Resource": "*",
                    "Condition": {"StringEquals": {"kms:ViaService": format!("{service}.{region}.amazonaws.com")}},
                }),
                None => json!({
                    "Effect": "Allow",
                    "Action": action,
                    "Resource": format!("arn:{}:ssm:{region}:*:parameter{target}", partition(region)),
                }),
            })
        })
        .collect();
    json!({"Version": "2012-10-17", "Statement": statements}).to_string()
}

/// What a policy document allows, in the topology's lines. IAM returns documents
/// URL-encoded; an unreadable one allows nothing rigger knows.
pub fn permissions(document: &str) -> BTreeSet<String> {
    let text = if document.trim_start().starts_with('{') {
        document.to_owned()
    } else {
        percent_decode(document)
    };
    let Ok(policy) = serde_json::from_str::<Json>(&text) else {
        return BTreeSet::new();
    };
    let list = |value: Option<&Json>| -> Vec<String> {
        match value {
            Some(Json::String(s)) => vec![s.clone()],
            Some(Json::Array(items)) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    };
    let statements = match policy.get("Statement") {
        Some(Json::Array(items)) => items.clone(),
        Some(single) => vec![single.clone()],
        None => Vec::new(),
    };
    let mut lines = BTreeSet::new();
    for statement in statements {
        if statement.get("Effect").and_then(Json::as_str) != Some("Allow") {
            continue;
        }
        let via = statement
            .pointer("/Condition/StringEquals/kms:ViaService")
            .and_then(Json::as_str)
            .map(|s| s.split('.').next().unwrap_or(s).to_owned());
        for action in list(statement.get("Action")) {
            for resource in list(statement.get("Resource")) {
                let target = match (&via, resource.split_once(":parameter")) {
                    (Some(service), _) => format!("via {service}"),
                    (None, Some((_, path))) => path.to_owned(),
                    (None, None) => match resource.split_once(":s3:::") {
                        Some((_, object)) => format!("s3:::{object}"),
                        None => resource.clone(),
                    },
                };
                lines.insert(format!("{action} {target}"));
            }
        }
    }
    lines
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
