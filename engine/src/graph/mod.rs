//! Nodes, devices and the registry that names them.
//!
//! A node is one driver instance; a device is a named entry point (the `id`
//! of a top-level blockdev) with the device-level policies. Every request
//! through a node is accounted in that node's statistics.

mod removal;

pub use crate::device::{Device, ExportKind, Role};
use crate::drivers::{self, Done, Driver, Status};
use crate::error::{Error, Result};
use crate::io::Buf;
use crate::options::{
    Aio, BlockdevOptions, BlockdevRef, DetectZeroes, Discard, DriverName, DriverOptions, OnError,
};
use crate::perm;
use crate::qmp::EventBus;
use crate::stats::{accounted, Op, Stats};
use parking_lot::RwLock;
use std::sync::Arc;

/// Options of a node after inheritance from its parent and defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeOptions {
    pub read_only: bool,
    /// `force-share`: image locks share every permission (read-only only).
    pub force_share: bool,
    pub writeback: bool,
    pub direct: bool,
    pub no_flush: bool,
    pub aio: Aio,
    pub discard: Discard,
    pub detect_zeroes: DetectZeroes,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            read_only: false,
            force_share: false,
            writeback: true,
            direct: false,
            no_flush: false,
            aio: Aio::Threads,
            discard: Discard::Ignore,
            detect_zeroes: DetectZeroes::Off,
        }
    }
}

impl NodeOptions {
    fn resolve(o: &BlockdevOptions, parent: &NodeOptions) -> NodeOptions {
        NodeOptions {
            read_only: o.read_only.unwrap_or(parent.read_only),
            force_share: o.force_share.unwrap_or(parent.force_share),
            writeback: o.cache.writeback.unwrap_or(parent.writeback),
            direct: o.cache.direct.unwrap_or(parent.direct),
            no_flush: o.cache.no_flush.unwrap_or(parent.no_flush),
            aio: o.aio.unwrap_or(parent.aio),
            discard: o.discard.unwrap_or(parent.discard),
            detect_zeroes: o.detect_zeroes.unwrap_or(parent.detect_zeroes),
        }
    }

    /// A `file` child that opens `filename` with these cache and aio options.
    pub fn file_spec(&self, filename: &str) -> serde_json::Value {
        let mut spec = serde_json::json!({"driver": "file", "filename": filename});
        self.put_io_keys(&mut spec);
        spec
    }

    /// Sets `spec`'s `cache` and `aio` keys to these options.
    pub fn put_io_keys(&self, spec: &mut serde_json::Value) {
        spec["cache"] = serde_json::json!({
            "direct": self.direct, "no-flush": self.no_flush, "writeback": self.writeback
        });
        spec["aio"] = serde_json::json!(self.aio.as_str());
    }
}

pub struct Node {
    pub name: String,
    pub opts: NodeOptions,
    pub driver: Box<dyn Driver>,
    pub stats: Arc<Stats>,
}

impl Node {
    pub fn size(&self) -> u64 {
        self.driver.size()
    }

    /// The options of the node that does this node's I/O: a format node's
    /// file child's (where `aio` and the cache mode usually are), else its own.
    pub fn io_opts(&self) -> NodeOptions {
        self.driver.file_child().map_or(self.opts, |f| f.opts)
    }

    fn writable(&self) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::io(
                libc::EROFS,
                format!("Node '{}' is read-only", self.name),
            ));
        }
        Ok(())
    }

    pub fn read(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let len = buf.len() as u64;
        self.driver.read(
            offset,
            buf,
            accounted(&self.stats, Op::Read, offset, len, done),
        );
    }

    pub fn write(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        if let Err(e) = self.writable() {
            return done(Err(e));
        }
        let len = buf.len() as u64;
        self.driver.write(
            offset,
            buf,
            accounted(&self.stats, Op::Write, offset, len, done),
        );
    }

    /// [`Driver::direct_extent`], with this node on the extent's path.
    pub fn direct_extent(&self, offset: u64, len: u64, write: bool) -> Option<drivers::Extent> {
        if write && self.opts.read_only {
            return None;
        }
        let mut extent = self.driver.direct_extent(offset, len, write)?;
        extent.path.push((self.stats.clone(), offset));
        Some(extent)
    }

    /// Writes `buf` to stable storage before `done` runs: in one request
    /// where the driver can (`RWF_DSYNC`), else a write and a flush.
    pub fn write_fua(self: &Arc<Self>, offset: u64, buf: Buf, done: Done<Buf>) {
        if let Err(e) = self.writable() {
            return done(Err(e));
        }
        let len = buf.len() as u64;
        let done = accounted(&self.stats, Op::Write, offset, len, done);
        if self.driver.has_fua() {
            return self.driver.write_fua(offset, buf, done);
        }
        let node = self.clone();
        self.driver.write(
            offset,
            buf,
            Box::new(move |r| match r {
                Ok(buf) => node.flush(Box::new(move |f| done(f.map(|()| buf)))),
                Err(e) => done(Err(e)),
            }),
        );
    }

    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, done: Done<()>) {
        if let Err(e) = self.writable() {
            return done(Err(e));
        }
        let unmap = unmap && self.opts.discard == Discard::Unmap;
        self.driver.write_zeroes(
            offset,
            len,
            unmap,
            accounted(&self.stats, Op::Write, offset, len, done),
        );
    }

    /// Passed down only when the node's `discard` option is `unmap`.
    pub fn discard(&self, offset: u64, len: u64, done: Done<()>) {
        if let Err(e) = self.writable() {
            return done(Err(e));
        }
        if self.opts.discard != Discard::Unmap {
            return done(Ok(()));
        }
        self.driver.discard(offset, len, done);
    }

    pub fn flush(&self, done: Done<()>) {
        if let Some(f) = self.driver.file_child() {
            f.debug_event(crate::options::BlkdebugEvent::FlushToOs);
            f.debug_event(crate::options::BlkdebugEvent::FlushToDisk);
        }
        self.driver
            .flush(accounted(&self.stats, Op::Flush, 0, 0, done));
    }

    pub fn block_status(&self, offset: u64, len: u64) -> Result<Status> {
        self.driver.block_status(offset, len)
    }

    /// Raises a blkdebug event on this node (drivers call it on their file child).
    pub fn debug_event(&self, ev: crate::options::BlkdebugEvent) {
        self.driver.debug_event(ev)
    }

    /// Number of backing files below this node.
    pub fn backing_depth(&self) -> usize {
        let mut depth = 0;
        let mut cur = self.driver.backing_child();
        while let Some(n) = cur {
            depth += 1;
            cur = n.driver.backing_child();
        }
        depth
    }
}

#[derive(Default)]
struct Registry {
    nodes: Vec<Arc<Node>>,
    /// QMP devices and the devices of exports (see [`Role`]).
    devices: Vec<Arc<Device>>,
    next_auto: u64,
    /// Top nodes of the user's blockdev-adds: deleted by name only, never
    /// as a side effect of deleting what used them (QEMU's monitor-owned).
    owned: std::collections::HashSet<String>,
}

impl Registry {
    fn node(&self, name: &str) -> Option<&Arc<Node>> {
        self.nodes.iter().find(|n| n.name == name)
    }

    fn device(&self, id: &str) -> Option<&Arc<Device>> {
        self.devices.iter().find(|d| d.id == id)
    }
}

type ResizeListener = Box<dyn Fn(&str) + Send + Sync>;
type RemoveListener = Box<dyn Fn(&Arc<Device>) + Send + Sync>;
/// Says why a device may not be deleted now (its file is open), if so.
type BusyCheck = Box<dyn Fn(&Device) -> Option<String> + Send + Sync>;

/// All nodes and devices of the daemon.
pub struct Graph {
    reg: RwLock<Registry>,
    events: Arc<EventBus>,
    /// Told the id of every device whose size changed (the export drops cached sizes).
    resize_listeners: parking_lot::Mutex<Vec<ResizeListener>>,
    /// Told every device deleted (the export forgets its file).
    remove_listeners: parking_lot::Mutex<Vec<RemoveListener>>,
    /// Told of a deletion that did not happen after all.
    cancel_listeners: parking_lot::Mutex<Vec<RemoveListener>>,
    busy_checks: parking_lot::Mutex<Vec<BusyCheck>>,
}

/// The result of `blockdev-add`.
pub struct Added {
    pub node: Arc<Node>,
    pub device: Option<Arc<Device>>,
}

impl Graph {
    pub fn new(events: Arc<EventBus>) -> Graph {
        Graph {
            reg: RwLock::default(),
            events,
            resize_listeners: Default::default(),
            remove_listeners: Default::default(),
            cancel_listeners: Default::default(),
            busy_checks: Default::default(),
        }
    }

    pub fn on_resize(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        self.resize_listeners.lock().push(Box::new(f));
    }

    /// Resizes a node with no request in flight on the devices whose size
    /// follows it (its root, or a format or filter above it through file
    /// children); they see the new size at once.
    pub fn resize(&self, node: &Arc<Node>, size: u64) -> Result<()> {
        let devices: Vec<_> = self
            .all_devices()
            .into_iter()
            .filter(|d| {
                std::iter::successors(Some(d.root()), |n| n.driver.file_child().cloned())
                    .any(|n| Arc::ptr_eq(&n, node))
            })
            .collect();
        quiesced_all(&devices, || node.driver.resize(size))?;
        let listeners = self.resize_listeners.lock();
        for d in &devices {
            for l in listeners.iter() {
                l(&d.id);
            }
        }
        Ok(())
    }

    /// A QMP device by id (exports are not devices).
    pub fn device(&self, id: &str) -> Result<Arc<Device>> {
        self.reg
            .read()
            .device(id)
            .filter(|d| d.role == Role::Device)
            .cloned()
            .ok_or_else(|| Error::device_not_found(id))
    }

    /// The QMP devices (query-block, query-blockstats).
    pub fn devices(&self) -> Vec<Arc<Device>> {
        self.reg
            .read()
            .devices
            .iter()
            .filter(|d| d.role == Role::Device)
            .cloned()
            .collect()
    }

    /// Every device: the QMP ones and those of exports.
    pub fn all_devices(&self) -> Vec<Arc<Device>> {
        self.reg.read().devices.clone()
    }

    /// The files of the mount: QMP devices and FUSE exports, named by id.
    pub fn files(&self) -> Vec<Arc<Device>> {
        let reg = self.reg.read();
        reg.devices
            .iter()
            .filter(|d| d.role.in_mount())
            .cloned()
            .collect()
    }

    /// The file `id` of the mount.
    pub fn file(&self, id: &str) -> Option<Arc<Device>> {
        self.reg
            .read()
            .device(id)
            .filter(|d| d.role.in_mount())
            .cloned()
    }

    pub fn node(&self, name: &str) -> Option<Arc<Node>> {
        self.reg.read().node(name).cloned()
    }

    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.reg.read().nodes.clone()
    }

    /// Opens a node tree (and a device when it has an `id`). Nothing is
    /// registered unless the whole tree opens.
    pub fn add(&self, opts: &BlockdevOptions) -> Result<Added> {
        self.add_inner(opts, None)
    }

    /// `add` for the user (blockdev-add, `--blockdev`). A node without a
    /// device is theirs: it stays until blockdev-del names it, whatever
    /// stops using it. A device's nodes go with the device.
    pub fn add_by_user(&self, opts: &BlockdevOptions) -> Result<Added> {
        let added = self.add_inner(opts, None)?;
        if added.device.is_none() {
            self.reg.write().owned.insert(added.node.name.clone());
        }
        Ok(added)
    }

    /// `add` for an overlay that `device` moves onto once it is open: the
    /// device's use of its current root does not count against the overlay
    /// taking that root as its backing.
    pub fn add_overlay(&self, opts: &BlockdevOptions, device: &Arc<Device>) -> Result<Added> {
        self.add_inner(opts, Some(device))
    }

    fn add_inner(&self, opts: &BlockdevOptions, moving: Option<&Arc<Device>>) -> Result<Added> {
        self.add_replacing(opts, moving, None)
    }

    fn add_replacing(
        &self,
        opts: &BlockdevOptions,
        moving: Option<&Arc<Device>>,
        replacing: Option<&Arc<Node>>,
    ) -> Result<Added> {
        let mut reg = self.reg.write();
        let mut opener = Opener {
            replacing: replacing.cloned(),
            moving: moving.cloned(),
            reg: &reg,
            new_nodes: Vec::new(),
            next_auto: reg.next_auto,
            depth: 0,
            chain: Vec::new(),
            refs: Vec::new(),
            events: self.events.clone(),
        };
        if let Some(id) = &opts.id {
            check_name(id, "id")?;
            if reg.device(id).is_some() || reg.node(id).is_some() {
                return Err(Error::generic(format!("Duplicate ID '{id}' for drive")));
            }
            if opts.node_name.as_deref() == Some(id.as_str()) {
                return Err(Error::generic(format!(
                    "Device name '{id}' conflicts with its node name"
                )));
            }
        }
        let rerror = opts.rerror.unwrap_or(OnError::Report);
        let werror = opts.werror.unwrap_or(OnError::Enospc);
        if rerror == OnError::Enospc {
            return Err(Error::generic(
                "rerror=enospc is not a valid read error policy",
            ));
        }
        let node = opener.open(opts, &NodeOptions::default(), "", true)?;
        let passthrough = opts.passthrough == Some(true);
        if passthrough {
            check_passthrough(opts, &node)?;
        }
        let (new_nodes, next_auto) = (opener.new_nodes, opener.next_auto);
        if let Some(old) = replacing {
            reg.nodes.retain(|n| !Arc::ptr_eq(n, old));
        }
        reg.nodes.extend(new_nodes);
        reg.next_auto = next_auto;
        let device = opts.id.as_ref().map(|id| {
            let d = Device::new(
                id.clone(),
                Role::Device,
                node.clone(),
                rerror,
                werror,
                self.events.clone(),
                passthrough,
            );
            reg.devices.push(d.clone());
            d
        });
        Ok(Added { node, device })
    }

    /// Reopens a format node over a file read-only or read-write, as QEMU's
    /// bdrv_reopen does for a commit's base: a new node of the same name on
    /// a new descriptor (with the image's rw open checks and locks) takes
    /// the old one's place under its parents, with `device` quiesced.
    pub fn reopen(&self, node: &Arc<Node>, read_only: bool, device: &Device) -> Result<Arc<Node>> {
        if node.opts.read_only == read_only {
            return Ok(node.clone());
        }
        let refuse = |why: &str| {
            Error::generic(format!(
                "Cannot reopen node '{}' {}: {why}",
                node.name,
                if read_only { "read-only" } else { "read-write" }
            ))
        };
        let file = node
            .driver
            .file_child()
            .cloned()
            .ok_or_else(|| refuse("it has no file"))?;
        if file.driver.file_child().is_some() || file.driver.backing_child().is_some() {
            return Err(refuse("only a format over a plain file can be reopened"));
        }
        // Its overlay (one) and `device` may use it; anyone else would see
        // it change under them.
        let users = {
            let reg = self.reg.read();
            perm::users(&reg.nodes, &reg.devices, node)
        };
        let mut allowed = [
            (perm::Role::Backing, 1),
            (
                perm::Role::Root,
                usize::from(Arc::ptr_eq(&device.root(), node)),
            ),
        ];
        let others: Vec<String> = users
            .into_iter()
            .filter(
                |u| match allowed.iter_mut().find(|(r, n)| *r == u.role && *n > 0) {
                    Some((_, n)) => {
                        *n -= 1;
                        false
                    }
                    None => true,
                },
            )
            .map(|u| u.who)
            .collect();
        if !others.is_empty() {
            return Err(refuse(&format!("it is also used by {}", others.join(", "))));
        }
        let o = &node.opts;
        let mut spec = serde_json::json!({
            "driver": node.driver.format_name(),
            "read-only": read_only,
            "file": file.opts.file_spec(&file.driver.filename()),
            "discard": o.discard.as_str(),
            "detect-zeroes": o.detect_zeroes.as_str(),
        });
        o.put_io_keys(&mut spec);
        if let Some(b) = node.driver.backing_child() {
            spec["backing"] = serde_json::json!(b.name);
        } else if crate::drivers::has_backing_file(node.driver.format_name()) {
            spec["backing"] = serde_json::json!("");
        }
        let opts = BlockdevOptions::from_json(spec)?;
        let new = device.quiesced(|| {
            drivers::wait(|d| node.flush(d))?;
            node.driver.set_locks(false)?;
            let new = match self.add_replacing(&opts, None, Some(node)) {
                Ok(a) => a.node,
                Err(e) => {
                    if let Err(l) = node.driver.set_locks(true) {
                        log::error!("node '{}' could not take its locks again: {l}", node.name);
                    }
                    return Err(e);
                }
            };
            for p in self.nodes() {
                if p.driver
                    .backing_child()
                    .is_some_and(|b| Arc::ptr_eq(&b, node))
                {
                    p.driver.set_backing(Some(new.clone()))?;
                }
            }
            if Arc::ptr_eq(&device.root(), node) {
                device.replace_root(new.clone());
            }
            Ok(new)
        })?;
        self.forget_chain(Some(node.clone()), new.driver.backing_child().as_ref());
        Ok(new)
    }

    /// Drops from the registry the nodes a job took out of a chain: `top`
    /// and its backing chain down to `base` (exclusive), with their file
    /// children, as far as nothing else uses them and the user did not add
    /// them as nodes of their own. They close once their last request is
    /// done.
    pub fn forget_chain(&self, top: Option<Arc<Node>>, base: Option<&Arc<Node>>) {
        let mut candidates = Vec::new();
        let mut cur = top;
        while let Some(n) = cur {
            if base.is_some_and(|b| Arc::ptr_eq(b, &n)) {
                break;
            }
            cur = n.driver.backing_child();
            let mut below = vec![n];
            while let Some(x) = below.pop() {
                below.extend(x.driver.file_child().cloned());
                below.extend(x.driver.other_children());
                candidates.push(x);
            }
        }
        let mut closing = Vec::new();
        {
            let mut reg = self.reg.write();
            loop {
                let unused = candidates.iter().position(|c| {
                    reg.nodes.iter().any(|n| Arc::ptr_eq(n, c))
                        && !reg.owned.contains(&c.name)
                        && perm::users(&reg.nodes, &reg.devices, c).is_empty()
                });
                let Some(i) = unused else { break };
                let node = candidates.swap_remove(i);
                reg.nodes.retain(|n| !Arc::ptr_eq(n, &node));
                closing.push(node);
            }
        }
        // Parents first (their close may write to their files), and
        // outside the registry lock: a close may run a whole repair.
        for node in closing {
            if let Err(e) = node.driver.close() {
                log::warn!("closing node '{}': {e}", node.name);
            }
        }
    }

    /// Closes every node, top-down (after the last request); used at shutdown.
    pub fn close_all(&self) -> Vec<Error> {
        self.nodes()
            .iter()
            .rev()
            .filter_map(|n| n.driver.close().err().map(|e| e.context(&n.name)))
            .collect()
    }

    /// Before the daemon exits: no `cont` will come, so the requests the
    /// error policy holds fail now and no device stops again
    /// ([`Device::shut_down`]). Call before [`Graph::flush_all`], whose
    /// flushes would otherwise wait behind a stopped device forever.
    /// Then drains every device: requests in flight finish, new ones wait
    /// at the gate until the process exits.
    pub fn shut_down(&self) {
        let devices = self.all_devices();
        for d in &devices {
            d.shut_down();
        }
        for d in &devices {
            d.drain();
        }
    }

    /// Flushes every device's root node (the devices are drained, their
    /// gates closed); used at shutdown. Returns the failures.
    pub fn flush_all(&self) -> Vec<Error> {
        self.all_devices()
            .iter()
            .filter_map(|d| {
                let root = d.root();
                drivers::wait(|done| root.flush(done))
                    .err()
                    .map(|e| e.context(&d.id))
            })
            .collect()
    }
}

fn quiesced_all<R>(devices: &[Arc<Device>], f: impl FnOnce() -> Result<R>) -> Result<R> {
    match devices {
        [] => f(),
        [d, rest @ ..] => d.quiesced(|| quiesced_all(rest, f)),
    }
}

/// Longest device id: NAME_MAX of the filesystems a mount's names pass through.
const MAX_ID_LEN: usize = 255;

fn check_name(name: &str, what: &str) -> Result<()> {
    let mut chars = name.chars();
    let well_formed = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
    if !well_formed {
        return Err(Error::generic(format!(
            "Invalid {what} '{name}': it must start with a letter and contain only letters, digits, '-', '.' and '_'"
        )));
    }
    if what == "node-name" && name.len() > 31 {
        return Err(Error::generic(format!("Node name too long: '{name}'")));
    }
    // A device id is a file name in the mount.
    if name.len() > MAX_ID_LEN {
        return Err(Error::generic(format!(
            "Invalid {what}: {} bytes long, at most {MAX_ID_LEN} are allowed (it names a file in the mount)",
            name.len()
        )));
    }
    Ok(())
}

/// Whether a device may be exported with `x-passthrough`: the kernel then
/// reads and writes its file directly, so the device must be that file's
/// bytes (raw on a regular file) with no policy that needs to see the I/O.
fn check_passthrough(o: &BlockdevOptions, node: &Node) -> Result<()> {
    let refuse = |why: &str| Err(Error::generic(format!("x-passthrough: {why}")));
    if o.id.is_none() {
        return refuse("it applies to a device: it needs an 'id'");
    }
    if node.driver.passthrough_fd().is_none() {
        return refuse(&format!(
            "it needs a raw device directly on a regular file, not {} on {}",
            node.driver.format_name(),
            node.driver
                .file_child()
                .map_or("nothing", |f| f.driver.format_name())
        ));
    }
    if node.opts.detect_zeroes != DetectZeroes::Off {
        return refuse("detect-zeroes needs to see every write; it must be off");
    }
    for (key, policy) in [("rerror", o.rerror), ("werror", o.werror)] {
        if policy.is_some_and(|p| p != OnError::Report) {
            return refuse(&format!(
                "errors go straight to the caller; {key} must be report"
            ));
        }
    }
    Ok(())
}

/// Longest backing chain opened (qemu-img handles chains of this order).
const MAX_CHAIN_DEPTH: usize = 1024;

/// The words that start the error of a backing file that failed to open;
/// added once, by the innermost layer, not once per layer.
const BACKING_FAILED: &str = "Could not open backing file";

struct Opener<'r> {
    reg: &'r Registry,
    new_nodes: Vec<Arc<Node>>,
    next_auto: u64,
    /// Backing files opened above the current node.
    depth: usize,
    /// The images of the chain being opened, top first: a backing file
    /// that is one of them is a loop.
    chain: Vec<ChainId>,
    /// Existing nodes this add uses by reference, and how.
    refs: Vec<(Arc<Node>, perm::User)>,
    /// A device that moves onto the new node (a snapshot's overlay).
    moving: Option<Arc<Device>>,
    /// A node the new one replaces (a reopen): its name is free.
    replacing: Option<Arc<Node>>,
    /// Where filters report what they find (quorum votes, blkverify).
    events: Arc<EventBus>,
}

/// How a parent uses a child it opens or references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Use {
    /// Raw or a filter: passes writes and resizes through.
    Shared,
    /// A format's file, holding its metadata: no other writer.
    Metadata,
    Backing,
}

impl Opener<'_> {
    fn name_taken(&self, name: &str) -> bool {
        if self.replacing.as_ref().is_some_and(|r| r.name == name) {
            return false;
        }
        self.reg.node(name).is_some()
            || self.reg.device(name).is_some()
            || self.new_nodes.iter().any(|n| n.name == name)
    }

    fn open(
        &mut self,
        o: &BlockdevOptions,
        parent: &NodeOptions,
        path: &str,
        top: bool,
    ) -> Result<Arc<Node>> {
        if !top && o.id.is_some() {
            return Err(Error::generic(format!(
                "Parameter '{path}.id' is unexpected: only a top-level node can be a device"
            )));
        }
        let name = match &o.node_name {
            Some(n) => {
                check_name(n, "node-name")?;
                if self.name_taken(n) {
                    return Err(Error::generic(format!("Duplicate node name '{n}'")));
                }
                n.clone()
            }
            // A reopened node keeps its name, automatic ones too.
            None if top && self.replacing.is_some() => self
                .replacing
                .as_ref()
                .map(|r| r.name.clone())
                .unwrap_or_default(),
            None => {
                self.next_auto += 1;
                format!("#block{:03}", self.next_auto)
            }
        };
        let mut opts = NodeOptions::resolve(o, parent);
        if let DriverOptions::Vvfat { rw, .. } = &o.specific {
            drivers::vvfat::settle_read_only(*rw, o.read_only, top, &mut opts)?;
        }
        if opts.detect_zeroes == DetectZeroes::Unmap && opts.discard != Discard::Unmap {
            return Err(Error::generic(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap",
            ));
        }
        if opts.force_share && !opts.read_only {
            return Err(Error::generic(
                "force-share=on can only be used with read-only images",
            ));
        }
        if !top && parent.read_only != opts.read_only && !parent.read_only {
            return Err(Error::generic(format!(
                "'{path}' is read-only but its parent needs write access"
            )));
        }
        let driver: Box<dyn Driver> = match (&o.specific, o.driver) {
            (DriverOptions::File { filename, locking }, d) if host(d).is_some() => {
                let host = host(d).unwrap_or(drivers::file::Host::File);
                Box::new(drivers::file::FileDriver::open(
                    host, filename, *locking, &opts,
                )?)
            }
            (DriverOptions::Curl(c), d) => Box::new(drivers::curl::CurlDriver::open(d, c, &opts)?),
            (DriverOptions::Format { file, .. }, DriverName::Raw) => {
                let child = self.child(file, &opts, &join(path, "file"), Use::Shared)?;
                Box::new(drivers::raw::RawDriver::new(
                    child,
                    o.probed && !opts.read_only,
                ))
            }
            (
                DriverOptions::Format {
                    file,
                    backing,
                    qcow2,
                },
                DriverName::Qcow2,
            ) => {
                let child = self.child(file, &opts, &join(path, "file"), Use::Metadata)?;
                let header = drivers::qcow2::read_header(&child)
                    .map_err(|e| e.context(child.driver.filename()))?;
                let backing = self.format_backing(
                    backing,
                    header.backing_file.as_deref(),
                    header.backing_format.as_deref(),
                    &child,
                    &opts,
                    path,
                )?;
                Box::new(Arc::new(drivers::qcow2::Qcow2Driver::open(
                    child,
                    header,
                    backing,
                    qcow2,
                    opts.read_only,
                    opts.discard == Discard::Unmap,
                )?))
            }
            (
                DriverOptions::Blkdebug {
                    image,
                    config,
                    align,
                    inject_error,
                    set_state,
                },
                DriverName::Blkdebug,
            ) => {
                let child = self.child(image, &opts, &join(path, "image"), Use::Shared)?;
                Box::new(drivers::blkdebug::BlkdebugDriver::open(
                    child,
                    config.as_deref(),
                    *align,
                    inject_error,
                    set_state,
                )?)
            }
            (DriverOptions::Blkverify { test, raw }, DriverName::Blkverify) => {
                let test = self.child(test, &opts, &join(path, "test"), Use::Metadata)?;
                let raw = self.child(raw, &opts, &join(path, "raw"), Use::Metadata)?;
                Box::new(drivers::blkverify::BlkverifyDriver::open(
                    name.clone(),
                    test,
                    raw,
                    self.events.clone(),
                )?)
            }
            (
                DriverOptions::Quorum {
                    blkverify,
                    children,
                    vote_threshold,
                    rewrite_corrupted,
                },
                DriverName::Quorum,
            ) => {
                let children = children
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let at = join(path, &format!("children.{i}"));
                        self.child(c, &opts, &at, Use::Metadata)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let config = drivers::quorum::Config {
                    threshold: *vote_threshold,
                    blkverify: blkverify.unwrap_or(false),
                    rewrite_corrupted: rewrite_corrupted.unwrap_or(false),
                };
                let reference = o.id.clone().unwrap_or_else(|| name.clone());
                Box::new(drivers::quorum::QuorumDriver::open(
                    reference,
                    children,
                    config,
                    self.events.clone(),
                )?)
            }
            (DriverOptions::Format { file, backing, .. }, DriverName::Qcow) => {
                let child = self.child(file, &opts, &join(path, "file"), Use::Metadata)?;
                let header = drivers::qcow::read_header(&child)
                    .map_err(|e| e.context(child.driver.filename()))?;
                let backing = self.format_backing(
                    backing,
                    header.backing_file.as_deref(),
                    None,
                    &child,
                    &opts,
                    path,
                )?;
                Box::new(Arc::new(drivers::qcow::QcowDriver::open(
                    child, header, backing,
                )?))
            }
            (DriverOptions::Format { file, backing, .. }, d) if drivers::mapped::drives(d) => {
                if !opts.read_only && !drivers::mapped::writes(d) {
                    return Err(drivers::mapped::read_only_error(d.as_str()));
                }
                let child = self.child(file, &opts, &join(path, "file"), Use::Metadata)?;
                let dir = std::path::Path::new(&child.driver.filename())
                    .parent()
                    .map(|p| p.to_path_buf())
                    .unwrap_or_default();
                let mut n = 0;
                let mut open_file = |name: &str, read_only: bool| {
                    let full = dir.join(name).to_string_lossy().into_owned();
                    let spec = serde_json::json!({"driver": "file", "filename": full,
                        "read-only": read_only || opts.read_only});
                    let r = BlockdevRef::Definition(Box::new(BlockdevOptions::from_json(spec)?));
                    n += 1;
                    let at = join(path, &format!("extents.{n}"));
                    self.child(&r, &opts, &at, Use::Metadata)
                };
                let layout =
                    drivers::mapped::open_layout(d, child.clone(), opts.read_only, &mut open_file)
                        .map_err(|e| e.context(child.driver.filename()))?;
                let backing = self.format_backing(
                    backing,
                    layout.backing_file().as_deref(),
                    layout.backing_format().as_deref(),
                    &child,
                    &opts,
                    path,
                )?;
                Box::new(Arc::new(drivers::mapped::Mapped::new(
                    child, layout, backing,
                )))
            }
            (
                DriverOptions::Vvfat {
                    dir,
                    fat_type,
                    floppy,
                    ..
                },
                DriverName::Vvfat,
            ) => Box::new(drivers::vvfat::VvfatDriver::open(dir, *fat_type, *floppy)?),
            (_, d) => {
                return Err(Error::generic(format!(
                    "Driver '{}' is not supported by blkfs yet",
                    d.as_str()
                )))
            }
        };
        let node = Arc::new(Node {
            name,
            opts,
            driver,
            stats: Arc::default(),
        });
        self.new_nodes.push(node.clone());
        Ok(node)
    }

    /// The backing node of a format node: as the options say (`null`: none),
    /// else the file the image header names, read-only.
    fn format_backing(
        &mut self,
        option: &Option<Option<BlockdevRef>>,
        header_name: Option<&str>,
        header_format: Option<&str>,
        image: &Node,
        opts: &NodeOptions,
        path: &str,
    ) -> Result<Option<Arc<Node>>> {
        // As QEMU: the chain is read with the image's aio and cache mode
        // (its file's, where `file.aio=native` and the like are given).
        let ro = NodeOptions {
            read_only: true,
            aio: image.opts.aio,
            direct: image.opts.direct,
            no_flush: image.opts.no_flush,
            writeback: image.opts.writeback,
            ..*opts
        };
        Ok(match (option, header_name) {
            (Some(None), _) | (None, None) => None,
            (Some(Some(r)), _) => Some(self.backing(r, &ro, &join(path, "backing"))?),
            (None, Some(name)) => {
                Some(self.backing_from_header(name, header_format, image, &ro, path)?)
            }
        })
    }

    /// A backing node: always read-only, at most MAX_CHAIN_DEPTH deep.
    fn backing(&mut self, r: &BlockdevRef, ro: &NodeOptions, path: &str) -> Result<Arc<Node>> {
        if self.depth >= MAX_CHAIN_DEPTH {
            return Err(Error::generic(format!(
                "{BACKING_FAILED}: the backing chain is deeper than {MAX_CHAIN_DEPTH} images"
            )));
        }
        self.depth += 1;
        let r = match r {
            BlockdevRef::Definition(o) => {
                let mut o = o.clone();
                o.read_only = Some(true);
                BlockdevRef::Definition(o)
            }
            BlockdevRef::Reference(_) => r.clone(),
        };
        let node = self.child(&r, ro, path, Use::Backing);
        self.depth -= 1;
        node
    }

    /// Opens the backing file an image names, relative to the image's
    /// directory (or URL: a remote image's backing file is remote too).
    fn backing_from_header(
        &mut self,
        name: &str,
        format: Option<&str>,
        image: &Node,
        ro: &NodeOptions,
        path: &str,
    ) -> Result<Arc<Node>> {
        let top = image.driver.filename();
        let url = drivers::curl::backing_url(&top, name);
        let full = if let Some(url) = &url {
            url.clone()
        } else if name.starts_with('/') {
            name.to_string()
        } else {
            let dir = std::path::Path::new(&top)
                .parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_default();
            dir.join(name).to_string_lossy().into_owned()
        };
        let top_id = chain_identity(&top);
        if let Some(id) = chain_identity(&full) {
            if Some(&id) == top_id.as_ref() || self.chain.contains(&id) {
                return Err(Error::generic(format!(
                    "{BACKING_FAILED} '{full}': backing file loop: '{top}' leads back to an image of its own chain"
                )));
            }
        }
        let format = match format {
            Some(f) => f.to_string(),
            None => drivers::probe::probe(&full)?.to_string(),
        };
        let file_driver = url
            .as_deref()
            .and_then(drivers::curl::Protocol::of_url)
            .map_or("file", drivers::curl::Protocol::name);
        let spec = serde_json::json!({"driver": format, "file": {"driver": file_driver, "filename": full}});
        let opts = BlockdevOptions::from_json(spec).map_err(|e| {
            Error::generic(format!(
                "Backing file '{name}' of {}: {e}",
                image.driver.filename()
            ))
        })?;
        let pushed = top_id.is_some();
        self.chain.extend(top_id);
        let node = self.backing(
            &BlockdevRef::Definition(Box::new(opts)),
            ro,
            &join(path, "backing"),
        );
        if pushed {
            self.chain.pop();
        }
        node.map_err(|e| {
            if e.to_string().starts_with(BACKING_FAILED) {
                e
            } else {
                e.context(format!("{BACKING_FAILED} '{full}'"))
            }
        })
    }

    fn child(
        &mut self,
        r: &BlockdevRef,
        parent: &NodeOptions,
        path: &str,
        how: Use,
    ) -> Result<Arc<Node>> {
        match r {
            BlockdevRef::Definition(o) => self.open(o, parent, path, false),
            BlockdevRef::Reference(name) => {
                let node = self.reg.node(name).cloned().ok_or_else(|| {
                    Error::generic(format!("Cannot find device={name} nor node_name={name}"))
                })?;
                if node.opts.read_only && !parent.read_only {
                    return Err(Error::generic(format!(
                        "Node '{name}' is read-only and cannot be used as a writable '{path}'"
                    )));
                }
                // Users so far: registered ones, and this add's own earlier references.
                let nodes: Vec<Arc<Node>> = self.reg.nodes.clone();
                let devices: Vec<Arc<Device>> = self
                    .reg
                    .devices
                    .iter()
                    .filter(|d| !self.moving.as_ref().is_some_and(|m| Arc::ptr_eq(d, m)))
                    .cloned()
                    .collect();
                let mut existing = perm::users(&nodes, &devices, &node);
                existing.extend(
                    self.refs
                        .iter()
                        .filter(|(n, _)| Arc::ptr_eq(n, &node))
                        .map(|(_, u)| u.clone()),
                );
                let role = match how {
                    Use::Backing => perm::Role::Backing,
                    Use::Shared | Use::Metadata => perm::Role::File,
                };
                let user = perm::User::planned(parent, role, how == Use::Metadata);
                perm::check_new_user(&node, &existing, &user)?;
                self.refs.push((node.clone(), user));
                Ok(node)
            }
        }
    }
}

/// The host driver behind a protocol name, if it is one.
fn host(d: DriverName) -> Option<drivers::file::Host> {
    use drivers::file::Host;
    match d {
        DriverName::File => Some(Host::File),
        DriverName::HostDevice => Some(Host::Device),
        DriverName::HostCdrom => Some(Host::Cdrom),
        DriverName::HostFloppy => Some(Host::Floppy),
        _ => None,
    }
}

/// What tells two images of a chain apart: a local file's (device, inode),
/// a remote file's URL.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChainId {
    File(u64, u64),
    Url(String),
}

fn chain_identity(name: &str) -> Option<ChainId> {
    if drivers::curl::Protocol::of_url(name).is_some() {
        return Some(ChainId::Url(name.to_string()));
    }
    file_identity(name).map(|(dev, ino)| ChainId::File(dev, ino))
}

/// (device, inode) of a path, following symlinks; None when it cannot be stat'ed.
pub(crate) fn file_identity(path: &str) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}
