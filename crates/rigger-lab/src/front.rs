//! The lab's front to the emulator: every client of the lab's AWS API, rigger on this machine
//! and the AWS CLI inside machines, reaches the emulator through it.
//!
//! This first part is the hook other parts of the lab use to answer some calls themselves
//! (the emulator's answers are static where the lab knows better, e.g. a load balancer's
//! health): an [`Edge`] sees each call the front forwarded ([`EmulatorCall`]) with the
//! emulator's answer, and may replace the answer's body. The runner registers edges in an
//! [`Edges`] registry the front reads.

use std::sync::{Arc, RwLock};

/// One call to the emulator as the front saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EmulatorCall {
    /// The SigV4 credential scope's service, e.g. "elasticloadbalancing".
    pub service: String,
    /// Action= from query or form body, or the X-Amz-Target operation.
    pub action: String,
    /// Query + form parameters.
    pub params: Vec<(String, String)>,
}

/// Lets a part of the lab answer some calls itself (the emulator's answers are static where
/// the lab knows better).
pub trait Edge: Send + Sync {
    fn rewrite(&self, call: &EmulatorCall, status: u16, body: &[u8]) -> Option<Vec<u8>>;
}

/// The edges the front consults, in registration order; the runner adds them (also while the
/// front runs).
#[derive(Clone, Default)]
pub struct Edges {
    edges: Arc<RwLock<Vec<Arc<dyn Edge>>>>,
}

impl Edges {
    pub fn new() -> Edges {
        Edges::default()
    }

    /// Adds `edge`: from now on it sees every call.
    pub fn register(&self, edge: Arc<dyn Edge>) {
        self.edges.write().expect("edges lock").push(edge);
    }

    /// Whether any edge is registered (the front buffers answers only then).
    pub fn is_empty(&self) -> bool {
        self.edges.read().expect("edges lock").is_empty()
    }

    /// The body the lab answers `call` with: the first edge's rewrite, or `None` (the
    /// emulator's body stands).
    pub fn rewrite(&self, call: &EmulatorCall, status: u16, body: &[u8]) -> Option<Vec<u8>> {
        let edges = self.edges.read().expect("edges lock").clone();
        edges
            .iter()
            .find_map(|edge| edge.rewrite(call, status, body))
    }
}
