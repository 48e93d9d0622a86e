//! A disk's overlay chain and snapshot tree (pure data and planning; no I/O).
//!
//! Layers are qcow2 files; a layer's parent is another layer or (None) the shared base.
//! Taking a snapshot freezes the active layer and puts a new active layer on top;
//! reverting puts a new active layer on top of the snapshot's frozen layer, so the
//! snapshots form a tree. A layer is kept while it is active, a snapshot, or a parent.
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::names::hex;
use crate::qemu_img::Qcow2Options;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Layer {
    pub id: String,
    pub parent: Option<String>,
}

impl Layer {
    pub fn file_name(&self) -> String {
        format!("{}.qcow2", self.id)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Snapshot {
    pub name: String,
    pub layer: String,
    pub created_unix: u64,
}

/// disk.json: everything needed to rebuild the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskMeta {
    pub namespace: String,
    pub name: String,
    pub base: String,
    pub virtual_size: u64,
    pub options: Qcow2Options,
    pub layers: Vec<Layer>,
    pub active: String,
    pub snapshots: Vec<Snapshot>,
    pub next_id: u64,
}

impl DiskMeta {
    pub fn new(namespace: &str, name: &str, base: &str, virtual_size: u64) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            base: base.into(),
            virtual_size,
            options: Qcow2Options::for_overlay(virtual_size),
            layers: vec![Layer {
                id: "l1".into(),
                parent: None,
            }],
            active: "l1".into(),
            snapshots: Vec::new(),
            next_id: 2,
        }
    }

    pub fn layer(&self, id: &str) -> Option<&Layer> {
        self.layers.iter().find(|l| l.id == id)
    }

    pub fn snapshot(&self, name: &str) -> Option<&Snapshot> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    /// Layer ids from `id` down to the layer just above the base.
    pub fn chain_of(&self, id: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = Some(id.to_string());
        while let Some(c) = cur {
            if out.contains(&c) || out.len() > self.layers.len() {
                break; // a cycle would be a bug in the metadata; never loop forever
            }
            cur = self.layer(&c).and_then(|l| l.parent.clone());
            out.push(c);
        }
        out
    }

    /// Files in the active chain, base included (the chain depth).
    pub fn depth(&self) -> usize {
        self.chain_of(&self.active).len() + 1
    }

    pub fn children(&self, id: &str) -> Vec<String> {
        self.layers
            .iter()
            .filter(|l| l.parent.as_deref() == Some(id))
            .map(|l| l.id.clone())
            .collect()
    }

    /// Adds a layer on top of `parent` and returns its id.
    pub fn add_layer(&mut self, parent: Option<String>) -> String {
        let id = format!("l{}", self.next_id);
        self.next_id += 1;
        self.layers.push(Layer {
            id: id.clone(),
            parent,
        });
        id
    }

    /// Layers nothing needs any more (not active, not a snapshot, no children),
    /// removed from the metadata; their files are the caller's to delete.
    pub fn prune(&mut self) -> Vec<Layer> {
        let mut removed = Vec::new();
        loop {
            let dead: Vec<Layer> = self
                .layers
                .iter()
                .filter(|l| {
                    l.id != self.active
                        && !self.snapshots.iter().any(|s| s.layer == l.id)
                        && self.children(&l.id).is_empty()
                })
                .cloned()
                .collect();
            if dead.is_empty() {
                return removed;
            }
            self.layers.retain(|l| !dead.iter().any(|d| d.id == l.id));
            removed.extend(dead);
        }
    }

    /// Snapshot tree edges: (snapshot, nearest snapshot ancestor).
    pub fn snapshot_tree(&self) -> Vec<(String, Option<String>)> {
        self.snapshots
            .iter()
            .map(|s| {
                let parent = self.chain_of(&s.layer).into_iter().skip(1).find_map(|l| {
                    self.snapshots
                        .iter()
                        .find(|p| p.layer == l)
                        .map(|p| p.name.clone())
                });
                (s.name.clone(), parent)
            })
            .collect()
    }

    /// Stable QMP node-name prefix for this disk (node names are limited to 31 chars).
    pub fn node_prefix(&self) -> String {
        let h = hex(&Sha256::digest(format!("{}/{}", self.namespace, self.name)));
        format!("hvx{}", &h[..10])
    }

    pub fn node_name(&self, layer: Option<&str>) -> String {
        match layer {
            Some(id) => format!("{}-{id}", self.node_prefix()),
            None => format!("{}-base", self.node_prefix()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn tree_and_prune() {
        let mut m = DiskMeta::new("ns", "d", "abc", 1 << 30);
        // snapshot s1 of l1; active l2.
        m.snapshots.push(Snapshot {
            name: "s1".into(),
            layer: "l1".into(),
            created_unix: 0,
        });
        let l2 = m.add_layer(Some("l1".into()));
        m.active = l2.clone();
        m.snapshots.push(Snapshot {
            name: "s2".into(),
            layer: l2.clone(),
            created_unix: 0,
        });
        let l3 = m.add_layer(Some(l2.clone()));
        m.active = l3;
        assert_eq!(m.depth(), 4);
        // revert to s1: new active on l1; l3 is garbage.
        let l4 = m.add_layer(Some("l1".into()));
        m.active = l4;
        let removed = m.prune();
        assert_eq!(
            removed.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(),
            ["l3"]
        );
        assert_eq!(
            m.snapshot_tree(),
            [("s1".into(), None), ("s2".into(), Some("s1".into()))]
        );
        assert!(m.node_name(Some("l4")).len() <= 31);
    }
}
