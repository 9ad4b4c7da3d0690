//! Exports of nodes and the deletion of devices, exports and nodes.
//!
//! An export is a device of its own (role [`Role::Export`]) over a node:
//! a file in the mount named by the export's id, not a QMP device. Deleting
//! a device or an export fails its later requests with ENODEV and closes
//! the nodes only it used; a node the user added by itself stays until
//! blockdev-del names it.

use super::{check_name, Graph};
use crate::device::{Device, ExportKind, Role};
use crate::drivers;
use crate::error::{Error, ErrorKind, Result};
use crate::options::OnError;
use crate::perm;
use std::sync::Arc;

impl Graph {
    /// Told every deleted device or export (the mount forgets its file).
    pub fn on_removed(&self, f: impl Fn(&Arc<Device>) + Send + Sync + 'static) {
        self.remove_listeners.lock().push(Box::new(f));
    }

    /// Told of a deletion that the checks let through but that could not
    /// finish (the device is in use again).
    pub fn on_delete_cancelled(&self, f: impl Fn(&Arc<Device>) + Send + Sync + 'static) {
        self.cancel_listeners.lock().push(Box::new(f));
    }

    /// Adds a check that may refuse a deletion (a file still open); a check
    /// that lets it through may hold further use back until the device is
    /// removed or the deletion cancelled.
    pub fn on_busy_check(&self, f: impl Fn(&Device) -> Option<String> + Send + Sync + 'static) {
        self.busy_checks.lock().push(Box::new(f));
    }

    /// Exports node `node_name` as `id` (a file of the mount, or the device
    /// an NBD export serves).
    pub fn add_export(
        &self,
        id: &str,
        node_name: &str,
        writable: bool,
        kind: ExportKind,
    ) -> Result<Arc<Device>> {
        check_name(id, "id")?;
        let mut reg = self.reg.write();
        if reg.device(id).is_some() {
            return Err(Error::generic(format!(
                "Block export id '{id}' is already in use"
            )));
        }
        let node = reg.node(node_name).cloned().ok_or_else(|| {
            Error::new(
                ErrorKind::DeviceNotFound,
                format!("Cannot find node '{node_name}'"),
            )
        })?;
        if writable && node.opts.read_only {
            return Err(Error::generic(format!(
                "Cannot export node '{node_name}' as writable: it is read-only"
            )));
        }
        let existing = perm::users(&reg.nodes, &reg.devices, &node);
        let user = perm::User {
            who: format!("the export '{id}'"),
            role: perm::Role::Root,
            writes: writable,
            shares_write: node.opts.force_share,
            exclusive: false,
            parent: None,
        };
        perm::check_new_user(&node, &existing, &user)?;
        let dev = Device::new(
            id.to_string(),
            Role::Export { writable, kind },
            node,
            OnError::Report,
            OnError::Enospc,
            self.events.clone(),
            false,
        );
        reg.devices.push(dev.clone());
        Ok(dev)
    }

    /// Whether the user added node `name` by itself (see `add_by_user`).
    pub fn is_owned(&self, name: &str) -> bool {
        self.reg.read().owned.contains(name)
    }

    /// The devices of exports.
    pub fn exports(&self) -> Vec<Arc<Device>> {
        self.reg
            .read()
            .devices
            .iter()
            .filter(|d| d.role != Role::Device)
            .cloned()
            .collect()
    }

    /// An export's device by id.
    pub fn export(&self, id: &str) -> Result<Arc<Device>> {
        self.exports()
            .into_iter()
            .find(|d| d.id == id)
            .ok_or_else(|| Error::generic(format!("Export '{id}' is not found")))
    }

    /// Deletes a device or an export: refused while a check says it is in
    /// use, unless `force` (its file's open descriptors then get ENODEV).
    /// Requests in flight finish and the root is flushed first; a device's
    /// nodes close unless something else (or the user) keeps them.
    pub fn delete_device(&self, dev: &Arc<Device>, force: bool) -> Result<()> {
        if !force {
            for check in self.busy_checks.lock().iter() {
                if let Some(why) = check(dev) {
                    for l in self.cancel_listeners.lock().iter() {
                        l(dev);
                    }
                    let what = match dev.role {
                        Role::Device => "Device",
                        Role::Export { .. } => "Export",
                    };
                    return Err(Error::generic(format!(
                        "{what} '{}' is in use: {why}",
                        dev.id
                    )));
                }
            }
        }
        if !dev.remove() {
            dev.restore();
            for l in self.cancel_listeners.lock().iter() {
                l(dev);
            }
            return Err(Error::generic(format!(
                "'{}' still has requests in flight; it was not deleted",
                dev.id
            )));
        }
        self.reg.write().devices.retain(|d| !Arc::ptr_eq(d, dev));
        for l in self.remove_listeners.lock().iter() {
            l(dev);
        }
        let root = dev.root();
        if let Err(e) = drivers::wait(|d| root.flush(d)) {
            log::error!("'{}': flush at deletion failed: {e}", dev.id);
        }
        self.forget_chain(Some(root), None);
        Ok(())
    }

    /// blockdev-del of a node the user added by itself, once nothing uses it.
    pub fn delete_node(&self, name: &str) -> Result<()> {
        let node = {
            let mut reg = self.reg.write();
            let node = reg.node(name).cloned().ok_or_else(|| {
                Error::generic(format!("Failed to find node with node-name='{name}'"))
            })?;
            if let Some(d) = reg.devices.iter().find(|d| Arc::ptr_eq(&d.root(), &node)) {
                let hint = match d.role {
                    Role::Device => format!("device '{}' (delete it with id={})", d.id, d.id),
                    Role::Export { .. } => format!("export '{}' (block-export-del first)", d.id),
                };
                return Err(Error::generic(format!("Node '{name}' is in use by {hint}")));
            }
            if !reg.owned.contains(name) {
                return Err(Error::generic(format!(
                    "Node '{name}' is not owned by the monitor: it goes with the node or device above it"
                )));
            }
            let users = perm::users(&reg.nodes, &reg.devices, &node);
            if let Some(u) = users.first() {
                return Err(Error::generic(format!(
                    "Node '{name}' is in use by {}",
                    u.who
                )));
            }
            reg.owned.remove(name);
            node
        };
        if let Err(e) = drivers::wait(|d| node.flush(d)) {
            log::error!("node '{name}': flush at deletion failed: {e}");
        }
        self.forget_chain(Some(node), None);
        Ok(())
    }
}
