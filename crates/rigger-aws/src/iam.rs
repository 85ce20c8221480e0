//! The servers' IAM roles and instance profiles, one per server role
//! (`<project>-<env>-<role>-instance`, the role of the same name), made by rigger when
//! rigger.toml names no profile: the servers read their secrets from SSM with them at boot.
//!
//! The topology spells what each role allows as a set of lines (`ssm:GetParameter
//! /<project>/<env>/db_password`, `kms:Decrypt via ssm`, `s3:GetObject
//! s3:::<bucket>/releases/*`); [`policy_document`] turns them into the role's inline policy
//! and [`permissions`] reads a policy back into the same lines, so a policy changed by hand
//! shows in the plan as drift and `up` puts it back.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_iam::types::Tag;
use rigger_topology::{Resource, Value, tag};

use crate::context::Ctx;
use crate::error::{AwsError, Context as _, ErrorKind};
use crate::live::{LiveInstanceProfile, ROLE_POLICY};

pub use crate::policy::{permissions, policy_document};

/// Who may assume the role: EC2 instances.
const TRUST_POLICY: &str = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":{"Service":"ec2.amazonaws.com"},"Action":"sts:AssumeRole"}]}"#;

fn iam_tags(ctx: &Ctx<'_>, resource: &Resource) -> Vec<Tag> {
    ctx.tags(resource)
        .into_iter()
        .filter_map(|(key, value)| Tag::builder().key(key).value(value).build().ok())
        .collect()
}

fn tags_differ(resource: &Resource, have: &BTreeMap<String, String>) -> bool {
    resource
        .tags
        .iter()
        .any(|(k, v)| k != tag::RELEASE && have.get(k) != Some(v))
}

fn not_ours(operation: &'static str, name: &str, what: &str) -> AwsError {
    AwsError::precondition(
        operation,
        name,
        format!("{what} of this name exists without the environment's tags, so it is not rigger's"),
        "delete or rename it, or set `instance_profile` in rigger.toml to run the servers with a profile of your own",
    )
}

/// Makes the role (with its inline policy) and the instance profile holding it exist, tagged;
/// every step is skipped when already done, so an interrupted run converges.
pub(crate) async fn ensure(ctx: &Ctx<'_>, resource: &Resource) -> Result<(), AwsError> {
    let name = &resource.id.name;
    let iam = &ctx.clients.iam;
    let empty = LiveInstanceProfile::default();
    let live = ctx.live.instance_profiles.get(name).unwrap_or(&empty);
    let role = match resource.attributes.get("role").map(|a| &a.value) {
        Some(Value::Text(role)) => role.clone(),
        _ => name.clone(),
    };
    let permissions = match resource.attributes.get("permissions").map(|a| &a.value) {
        Some(Value::Set(lines)) => lines.clone(),
        _ => BTreeSet::new(),
    };

    if !live.role_exists {
        let created = iam
            .create_role()
            .role_name(&role)
            .assume_role_policy_document(TRUST_POLICY)
            .description(format!(
                "rigger: {} servers of {}/{} read their secrets",
                resource.tags.get(tag::ROLE).map_or("the", String::as_str),
                ctx.env.project(),
                ctx.env.name
            ))
            .set_tags(Some(iam_tags(ctx, resource)))
            .send()
            .await
            .op("CreateRole", &role);
        match created {
            Err(error) if error.code() == Some("EntityAlreadyExists") => {
                return Err(not_ours("CreateRole", &role, "a role"));
            }
            other => {
                other?;
            }
        }
    } else if tags_differ(resource, &live.tags) {
        iam.tag_role()
            .role_name(&role)
            .set_tags(Some(iam_tags(ctx, resource)))
            .send()
            .await
            .op("TagRole", &role)?;
    }
    iam.put_role_policy()
        .role_name(&role)
        .policy_name(ROLE_POLICY)
        .policy_document(policy_document(&permissions, &ctx.clients.region))
        .send()
        .await
        .op("PutRolePolicy", &role)?;

    if !live.profile_exists {
        let created = iam
            .create_instance_profile()
            .instance_profile_name(name)
            .set_tags(Some(iam_tags(ctx, resource)))
            .send()
            .await
            .op("CreateInstanceProfile", name);
        match created {
            Err(error) if error.code() == Some("EntityAlreadyExists") => {
                return Err(not_ours(
                    "CreateInstanceProfile",
                    name,
                    "an instance profile",
                ));
            }
            other => {
                other?;
            }
        }
    } else if tags_differ(resource, &live.tags) {
        iam.tag_instance_profile()
            .instance_profile_name(name)
            .set_tags(Some(iam_tags(ctx, resource)))
            .send()
            .await
            .op("TagInstanceProfile", name)?;
    }
    for other in live.roles.iter().filter(|r| **r != role) {
        iam.remove_role_from_instance_profile()
            .instance_profile_name(name)
            .role_name(other)
            .send()
            .await
            .op("RemoveRoleFromInstanceProfile", name)?;
    }
    if !live.roles.contains(&role) {
        iam.add_role_to_instance_profile()
            .instance_profile_name(name)
            .role_name(&role)
            .send()
            .await
            .op("AddRoleToInstanceProfile", name)?;
    }
    Ok(())
}

/// Deletes instance profile `name` and its role, whichever of them exists.
pub(crate) async fn delete(ctx: &Ctx<'_>, name: &str) -> Result<(), AwsError> {
    let Some(live) = ctx.live.instance_profiles.get(name) else {
        return Ok(());
    };
    let iam = &ctx.clients.iam;
    let gone = |result: Result<(), AwsError>| match result {
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    };
    if live.profile_exists {
        for role in &live.roles {
            gone(
                iam.remove_role_from_instance_profile()
                    .instance_profile_name(name)
                    .role_name(role)
                    .send()
                    .await
                    .op("RemoveRoleFromInstanceProfile", name)
                    .map(|_| ()),
            )?;
        }
        gone(
            iam.delete_instance_profile()
                .instance_profile_name(name)
                .send()
                .await
                .op("DeleteInstanceProfile", name)
                .map(|_| ()),
        )?;
    }
    if live.role_exists {
        gone(
            iam.delete_role_policy()
                .role_name(name)
                .policy_name(ROLE_POLICY)
                .send()
                .await
                .op("DeleteRolePolicy", name)
                .map(|_| ()),
        )?;
        gone(
            iam.delete_role()
                .role_name(name)
                .send()
                .await
                .op("DeleteRole", name)
                .map(|_| ()),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_reads_back_as_the_lines_it_was_made_from() {
        let lines: BTreeSet<String> = [
            "ssm:GetParameter /shop/prod/*",
            "ssm:GetParameters /shop/prod/*",
            "kms:Decrypt via ssm",
            "s3:GetObject s3:::shop-prod-releases-*/*",
            "ssm:PutParameter /shop/prod/hostkeys/${ec2:InstanceID}",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        let document = policy_document(&lines, "eu-west-1");
        // A server may write only the parameter named by its own instance id.
        assert!(
            document.contains(
                r#""Resource":"arn:aws:ssm:eu-west-1:*:parameter/shop/prod/hostkeys/${ec2:InstanceID}""#
            ),
            "{document}"
        );
        assert!(
            document.contains("arn:aws:s3:::shop-prod-releases-*/*"),
            "{document}"
        );
        assert!(
            document.contains("arn:aws:ssm:eu-west-1:*:parameter/shop/prod/*"),
            "{document}"
        );
        assert!(
            document.contains("ssm.eu-west-1.amazonaws.com"),
            "{document}"
        );
        assert_eq!(permissions(&document), lines);
        // As IAM returns it.
        let encoded: String = document
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        assert_eq!(permissions(&encoded), lines);
        assert!(permissions("not json").is_empty());
    }
}
