//! In-memory datapath for tests of the control plane.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use ipnet::IpNet;

use super::base::{Datapath, DatapathError, PruneReport, RemoteRoute};

/// A datapath that keeps its routes in a shared map, so a test can look.
#[derive(Clone, Debug, Default)]
pub struct MemoryDatapath {
    routes: Arc<Mutex<BTreeMap<IpNet, RemoteRoute>>>,
}

impl MemoryDatapath {
    /// An empty datapath.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the installed routes.
    pub fn snapshot(&self) -> BTreeMap<IpNet, RemoteRoute> {
        self.routes.lock().expect("memory datapath lock").clone()
    }
}

impl Datapath for MemoryDatapath {
    async fn upsert(&mut self, routes: &[RemoteRoute]) -> Result<(), DatapathError> {
        let mut m = self.routes.lock().expect("memory datapath lock");
        crate::compact::extend(&mut m, routes.iter().map(|r| (r.cidr, r.clone())).collect());
        Ok(())
    }

    async fn delete(&mut self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        let mut m = self.routes.lock().expect("memory datapath lock");
        for c in cidrs {
            m.remove(c);
        }
        Ok(())
    }

    async fn prune(&mut self, keep: &BTreeSet<IpNet>) -> Result<PruneReport, DatapathError> {
        let mut m = self.routes.lock().expect("memory datapath lock");
        let removed: Vec<IpNet> = m.keys().filter(|c| !keep.contains(c)).copied().collect();
        for c in &removed {
            m.remove(c);
        }
        Ok(PruneReport { removed })
    }

    async fn installed(&mut self) -> Result<Vec<RemoteRoute>, DatapathError> {
        Ok(self
            .routes
            .lock()
            .expect("memory datapath lock")
            .values()
            .cloned()
            .collect())
    }
}
