//! Permissions in the graph: may a node be written or resized under the
//! nodes that use it? The one place that answers, as QEMU's permission
//! system does for the cases blkfs meets.
//!
//! A node is used by devices (as their root) and by parent nodes, as their
//! `file` or `backing` child. A format with metadata (qcow2, qcow) shares
//! neither `write` nor `resize` on its file: what it wrote there is its
//! metadata, and the file's end is where it allocates. Raw and filters share
//! both (their size follows the file's). A backing child shares neither: the
//! overlay relies on what lies below it.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::graph::Node;
use std::sync::Arc;

/// How a user uses a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A device's root.
    Root,
    File,
    Backing,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Root => "root",
            Role::File => "file",
            Role::Backing => "backing",
        }
    }
}

/// One user of a node and what it needs and refuses.
#[derive(Clone)]
pub struct User {
    /// "node 'x'" or "device 'd'".
    pub who: String,
    pub role: Role,
    pub writes: bool,
    /// Refuses writers and resizes by anyone else.
    pub exclusive: bool,
    /// The parent node, when the user is one.
    pub parent: Option<Arc<Node>>,
}

impl User {
    /// A node `parent` about to use or using a child in `role`.
    pub fn node(parent: &Arc<Node>, role: Role) -> User {
        Self::planned(&parent.name, role, !parent.opts.read_only, {
            role == Role::Backing || !parent.driver.shares_file_resize()
        })
        .with_parent(parent)
    }

    /// A parent that is not open yet: its name, role and needs.
    pub fn planned(name: &str, role: Role, writes: bool, exclusive: bool) -> User {
        User {
            who: format!("node '{name}'"),
            role,
            writes: writes && role != Role::Backing,
            exclusive,
            parent: None,
        }
    }

    fn with_parent(mut self, parent: &Arc<Node>) -> User {
        self.parent = Some(parent.clone());
        self
    }
}

/// The users of `node` among `nodes` and `devices`.
pub fn users(nodes: &[Arc<Node>], devices: &[Arc<Device>], node: &Arc<Node>) -> Vec<User> {
    let mut out: Vec<User> = devices
        .iter()
        .filter(|d| Arc::ptr_eq(&d.root(), node))
        .map(|d| User {
            who: format!("device '{}'", d.id),
            role: Role::Root,
            writes: !d.read_only(),
            exclusive: false,
            parent: None,
        })
        .collect();
    for p in nodes {
        let d = &p.driver;
        if d.file_child().is_some_and(|c| Arc::ptr_eq(c, node)) {
            out.push(User::node(p, Role::File));
        }
        if d.backing_child().is_some_and(|c| Arc::ptr_eq(c, node)) {
            out.push(User::node(p, Role::Backing));
        }
    }
    out
}

/// A new user of `node` must not write where an existing one refuses
/// writers, nor refuse writers where one already writes.
pub fn check_new_user(node: &Node, existing: &[User], new: &User) -> Result<()> {
    for u in existing {
        let (blocker, perm_holder) = if new.writes && u.exclusive {
            (u, new)
        } else if new.exclusive && u.writes {
            (new, u)
        } else {
            continue;
        };
        return Err(Error::generic(format!(
            "Conflicts with use by {} as '{}', which does not allow 'write' on '{}' (needed by {} as '{}')",
            blocker.who,
            blocker.role.as_str(),
            node.name,
            perm_holder.who,
            perm_holder.role.as_str()
        )));
    }
    Ok(())
}

/// `block_resize` of `node`: refused when a user above it (directly, or
/// through parents whose size follows their file) does not share resize.
pub fn check_resize(nodes: &[Arc<Node>], devices: &[Arc<Device>], node: &Arc<Node>) -> Result<()> {
    let mut todo = vec![node.clone()];
    while let Some(n) = todo.pop() {
        for user in users(nodes, devices, &n) {
            if !user.exclusive {
                todo.extend(user.parent);
                continue;
            }
            return Err(Error::generic(format!(
                "Permission conflict on node '{}': permissions 'resize' are unshared by {} (uses node '{}' as '{}' child)",
                node.name,
                user.who,
                n.name,
                user.role.as_str()
            )));
        }
    }
    Ok(())
}
