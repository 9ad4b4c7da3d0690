//! Permissions in the graph: may an operation change a node under the
//! nodes that use it? The one place that answers, as QEMU's permission
//! system does for the cases blkfs meets.
//!
//! A node is used by its parents, as their `file` child or as their
//! `backing` child. A format with metadata (qcow2, qcow) does not share
//! `resize` on its file: the file's end is where it allocates. Filters and
//! raw share it (their size follows the file's); a backing child never
//! shares it (the overlay relies on what lies below it).

use crate::error::{Error, Result};
use crate::graph::{Graph, Node};
use std::sync::Arc;

/// How a parent uses a child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    File,
    Backing,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::File => "file",
            Role::Backing => "backing",
        }
    }
}

/// The nodes of `graph` that use `node` directly, with their role.
pub fn users(graph: &Graph, node: &Arc<Node>) -> Vec<(Arc<Node>, Role)> {
    graph
        .nodes()
        .into_iter()
        .filter_map(|p| {
            let d = &p.driver;
            if d.file_child().is_some_and(|c| Arc::ptr_eq(c, node)) {
                Some((p.clone(), Role::File))
            } else if d.backing_child().is_some_and(|c| Arc::ptr_eq(c, node)) {
                Some((p.clone(), Role::Backing))
            } else {
                None
            }
        })
        .collect()
}

/// `block_resize` of `node`: refused when a user above it (directly, or
/// through parents whose size follows their file) does not share resize.
pub fn check_resize(graph: &Graph, node: &Arc<Node>) -> Result<()> {
    let mut todo = vec![node.clone()];
    while let Some(n) = todo.pop() {
        for (user, role) in users(graph, &n) {
            if role == Role::File && user.driver.shares_file_resize() {
                todo.push(user);
                continue;
            }
            return Err(Error::generic(format!(
                "Permission conflict on node '{}': permissions 'resize' are unshared by node '{}' (uses node '{}' as '{}' child)",
                node.name,
                user.name,
                n.name,
                role.as_str()
            )));
        }
    }
    Ok(())
}
