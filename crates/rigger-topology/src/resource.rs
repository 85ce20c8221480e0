//! The vocabulary shared by the topology, the planner and the providers: resources named by
//! kind and name, with attribute values that can be compared.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

/// What a resource is. A small closed set: the seed's architecture and nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResourceKind {
    SecurityGroup,
    /// An SSH key pair rigger imported (`admin_public_key`); a `key_pair` named in
    /// rigger.toml is not rigger's and is no resource.
    KeyPair,
    /// The IAM role and instance profile the servers read their secrets with.
    InstanceProfile,
    LoadBalancer,
    LaunchTemplate,
    /// Legacy (`launch = "configuration"`): immutable, one per release. Named here without
    /// the UTC timestamp its name carries on AWS.
    LaunchConfiguration,
    AutoScalingGroup,
    /// A server started by an Auto Scaling group, named by its slot in the group.
    GroupServer,
    /// A stand-alone server: cache/queue, database primary, database replica.
    Server,
    /// A server's data volume.
    Volume,
}

impl ResourceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ResourceKind::SecurityGroup => "security_group",
            ResourceKind::KeyPair => "key_pair",
            ResourceKind::InstanceProfile => "instance_profile",
            ResourceKind::LoadBalancer => "load_balancer",
            ResourceKind::LaunchTemplate => "launch_template",
            ResourceKind::LaunchConfiguration => "launch_configuration",
            ResourceKind::AutoScalingGroup => "auto_scaling_group",
            ResourceKind::GroupServer => "group_server",
            ResourceKind::Server => "server",
            ResourceKind::Volume => "volume",
        }
    }
}

impl fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A resource's identity within one environment. Desired and observed resources with the same
/// id are the same resource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ResourceId {
    pub kind: ResourceKind,
    pub name: String,
}

impl ResourceId {
    pub fn new(kind: ResourceKind, name: impl Into<String>) -> Self {
        ResourceId {
            kind,
            name: name.into(),
        }
    }
}

impl fmt::Display for ResourceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.name)
    }
}

impl Serialize for ResourceId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}/{}", self.kind, self.name))
    }
}

/// An attribute's value. Sets are compared element by element so that a changed rule set shows
/// (and applies) only the rules added and removed, never "revoke all, add all".
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Integer(i64),
    Text(String),
    List(Vec<Value>),
    Set(BTreeSet<String>),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::Text(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Text(s)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<u32> for Value {
    fn from(n: u32) -> Self {
        Value::Integer(i64::from(n))
    }
}
impl From<u16> for Value {
    fn from(n: u16) -> Self {
        Value::Integer(i64::from(n))
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Integer(n) => write!(f, "{n}"),
            Value::Text(s) => write!(f, "{s:?}"),
            Value::List(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Value::Set(items) => {
                f.write_str("{")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item:?}")?;
                }
                f.write_str("}")
            }
        }
    }
}

/// What changing an attribute costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnChange {
    /// The provider changes the attribute on the live resource.
    UpdateInPlace,
    /// The resource must be replaced to change it (e.g. an instance's image).
    Replace,
}

/// A desired attribute: its value and what a change to it costs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Attribute {
    pub value: Value,
    pub on_change: OnChange,
}

/// Tag names rigger puts on every resource.
pub mod tag {
    pub const PROJECT: &str = "project";
    pub const ENVIRONMENT: &str = "environment";
    pub const ROLE: &str = "role";
    /// The release that last applied the resource. Informational: a different value alone
    /// never causes an action, or every deploy would touch every resource.
    pub const RELEASE: &str = "release";
}

/// A resource as the topology wants it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Resource {
    pub id: ResourceId,
    pub attributes: BTreeMap<String, Attribute>,
    pub tags: BTreeMap<String, String>,
    /// Resources that must exist before this one (and be deleted after it).
    pub depends_on: BTreeSet<ResourceId>,
}

impl Resource {
    pub fn new(kind: ResourceKind, name: impl Into<String>) -> Self {
        Resource {
            id: ResourceId::new(kind, name),
            attributes: BTreeMap::new(),
            tags: BTreeMap::new(),
            depends_on: BTreeSet::new(),
        }
    }

    /// Sets an attribute that the provider can change in place.
    pub fn set(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.attributes.insert(
            name.to_owned(),
            Attribute {
                value: value.into(),
                on_change: OnChange::UpdateInPlace,
            },
        );
        self
    }

    /// Sets an attribute whose change forces a replacement.
    pub fn set_immutable(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.attributes.insert(
            name.to_owned(),
            Attribute {
                value: value.into(),
                on_change: OnChange::Replace,
            },
        );
        self
    }

    pub fn depends_on(mut self, id: &ResourceId) -> Self {
        self.depends_on.insert(id.clone());
        self
    }

    pub fn tag(mut self, key: &str, value: impl Into<String>) -> Self {
        self.tags.insert(key.to_owned(), value.into());
        self
    }
}
