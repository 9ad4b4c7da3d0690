//! Permissions in the graph: may a node be written or resized under the
//! nodes that use it? The one place that answers, as QEMU's permission
//! system does for the cases blkfs meets.
//!
//! A node is used by devices (as their root) and by parent nodes, as their
//! `file` or `backing` child. Every user refuses other writers unless it
//! has `force-share` (QEMU's default, and what the image locks between
//! processes say): a writer is a node's only user. A format with metadata
//! (qcow2, qcow) and a backing user also refuse `resize` (the file's end is
//! where the format allocates; the overlay relies on what lies below it);
//! raw and filters follow their file's size, so their users decide.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::graph::{Node, NodeOptions};
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
    /// "'x' (uses it as 'file')", or "the new 'file'" for a user being opened.
    pub who: String,
    pub role: Role,
    pub writes: bool,
    /// `force-share`: lets others write (a read-only inspector). Every other
    /// user refuses writers besides itself, as QEMU's users do by default
    /// (and as the image locks between processes say).
    pub shares_write: bool,
    /// Refuses resizes by anyone else: a format's metadata file, a backing file.
    pub exclusive: bool,
    /// The parent node, when the user is one.
    pub parent: Option<Arc<Node>>,
}

impl User {
    /// A node `parent` using a child in `role`.
    pub fn node(parent: &Arc<Node>, role: Role) -> User {
        let mut u = Self::planned(&parent.opts, role, !parent.driver.shares_file_resize());
        u.who = format!("'{}' (uses it as '{}')", parent.name, role.as_str());
        u.parent = Some(parent.clone());
        u
    }

    /// A parent being opened with options `opts`; `metadata`: the child
    /// holds its metadata (qcow2, qcow).
    pub fn planned(opts: &NodeOptions, role: Role, metadata: bool) -> User {
        User {
            who: format!("the new '{}'", role.as_str()),
            role,
            writes: !opts.read_only && role != Role::Backing,
            shares_write: opts.force_share,
            exclusive: role == Role::Backing || metadata,
            parent: None,
        }
    }
}

/// The users of `node` among `nodes` and `devices`.
pub fn users(nodes: &[Arc<Node>], devices: &[Arc<Device>], node: &Arc<Node>) -> Vec<User> {
    let mut out: Vec<User> = devices
        .iter()
        .filter(|d| Arc::ptr_eq(&d.root(), node))
        .map(|d| User {
            who: format!("'{}' (uses it as 'root')", d.id),
            role: Role::Root,
            writes: !d.read_only(),
            shares_write: node.opts.force_share,
            exclusive: false,
            parent: None,
        })
        .collect();
    for p in nodes {
        let d = &p.driver;
        if d.file_child().is_some_and(|c| Arc::ptr_eq(c, node)) {
            out.push(User::node(p, Role::File));
        }
        if d.other_children().iter().any(|c| Arc::ptr_eq(c, node)) {
            out.push(User::node(p, Role::File));
        }
        if d.backing_child().is_some_and(|c| Arc::ptr_eq(&c, node)) {
            out.push(User::node(p, Role::Backing));
        }
    }
    out
}

/// A new user of `node` must not write where an existing one refuses
/// writers, nor refuse writers where one already writes.
pub fn check_new_user(node: &Node, existing: &[User], new: &User) -> Result<()> {
    for u in existing {
        let (needs, unshares) = if u.writes && !new.shares_write {
            (u, new)
        } else if new.writes && !u.shares_write {
            (new, u)
        } else {
            continue;
        };
        return Err(Error::generic(format!(
            "Permission conflict on node '{}': 'write' is required by {} and unshared by {}",
            node.name, needs.who, unshares.who
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
                "Permission conflict on node '{}': 'resize' is unshared by {}{}",
                node.name,
                user.who,
                if Arc::ptr_eq(&n, node) {
                    String::new()
                } else {
                    format!(" of node '{}' above it", n.name)
                }
            )));
        }
    }
    Ok(())
}
