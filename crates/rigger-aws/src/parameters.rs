//! Plain (not secret) SSM parameters rigger keeps its own records in: the deploy lock, the
//! rollout in progress, the history, maintenance mode. A missing parameter is `None`, never
//! an error (moto and AWS spell "not found" differently).

use aws_sdk_ssm::types::ParameterType;

use crate::Clients;
use crate::error::{AwsError, Context as _, ErrorKind};

fn is_missing(error: &AwsError) -> bool {
    error.kind() == ErrorKind::NotFound || error.code() == Some("ParameterNotFound")
}

/// The parameter's value, if it exists.
pub async fn get(clients: &Clients, name: &str) -> Result<Option<String>, AwsError> {
    match clients
        .ssm
        .get_parameter()
        .name(name)
        .send()
        .await
        .op("GetParameter", name)
    {
        Ok(answer) => Ok(answer
            .parameter()
            .and_then(|p| p.value())
            .map(str::to_owned)),
        Err(error) if is_missing(&error) => Ok(None),
        Err(error) => Err(error),
    }
}

/// The parameter's value read as JSON; `None` when missing or unreadable.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    clients: &Clients,
    name: &str,
) -> Result<Option<T>, AwsError> {
    Ok(get(clients, name)
        .await?
        .and_then(|value| serde_json::from_str(&value).ok()))
}

/// Every parameter under `path` (below it at any depth when `recursive`), as (name, value)
/// pairs in the order SSM gives them, all pages read. A SecureString's value is its
/// ciphertext: callers that list secrets use only the names.
pub async fn under(
    clients: &Clients,
    path: &str,
    recursive: bool,
) -> Result<Vec<(String, String)>, AwsError> {
    let pages = clients
        .ssm
        .get_parameters_by_path()
        .path(path)
        .recursive(recursive)
        .into_paginator()
        .send()
        .collect::<Vec<_>>()
        .await;
    let mut found = Vec::new();
    for page in pages {
        let page = page.op("GetParametersByPath", path)?;
        found.extend(page.parameters().iter().filter_map(|p| {
            Some((
                p.name()?.to_owned(),
                p.value().unwrap_or_default().to_owned(),
            ))
        }));
    }
    Ok(found)
}

/// The names of every parameter under `path`, at any depth.
pub async fn names_under(clients: &Clients, path: &str) -> Result<Vec<String>, AwsError> {
    Ok(under(clients, path, true)
        .await?
        .into_iter()
        .map(|(name, _)| name)
        .collect())
}

/// Writes the parameter, replacing its value.
pub async fn put(clients: &Clients, name: &str, value: &str) -> Result<(), AwsError> {
    clients
        .ssm
        .put_parameter()
        .name(name)
        .value(value)
        .r#type(ParameterType::String)
        .overwrite(true)
        .send()
        .await
        .op("PutParameter", name)?;
    Ok(())
}

/// Deletes the parameter; one already gone is fine.
pub async fn delete(clients: &Clients, name: &str) -> Result<(), AwsError> {
    match clients
        .ssm
        .delete_parameter()
        .name(name)
        .send()
        .await
        .op("DeleteParameter", name)
    {
        Err(error) if !is_missing(&error) => Err(error),
        _ => Ok(()),
    }
}
