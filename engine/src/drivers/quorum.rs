//! The `quorum` filter: every write goes to all children, every read is
//! done on all of them and decided by a vote on the content. A request
//! succeeds when at least `vote-threshold` children agree; the children
//! that failed or disagreed are reported (`QUORUM_REPORT_BAD`) and, with
//! `rewrite-corrupted`, given the winning data. Too few agreeing children
//! fail the request with EIO and `QUORUM_FAILURE`.

use super::fanout::{self, sectors};
use super::{Done, Driver, Status};
use crate::error::{Error, Result};
use crate::graph::Node;
use crate::io::Buf;
use crate::qmp::EventBus;
use parking_lot::RwLock;
use serde_json::json;
use std::sync::Arc;

pub struct QuorumDriver {
    /// What `QUORUM_FAILURE` names: the device id, else the node name.
    reference: String,
    children: RwLock<Vec<Arc<Node>>>,
    threshold: usize,
    /// Any disagreement fails the read (two children, both must agree).
    blkverify: bool,
    rewrite_corrupted: bool,
    events: Arc<EventBus>,
}

/// The quorum options, checked as QEMU checks them.
pub struct Config {
    pub threshold: i64,
    pub blkverify: bool,
    pub rewrite_corrupted: bool,
}

impl QuorumDriver {
    pub fn open(
        reference: String,
        children: Vec<Arc<Node>>,
        c: Config,
        events: Arc<EventBus>,
    ) -> Result<QuorumDriver> {
        let n = children.len();
        if n < 1 {
            return Err(Error::generic(
                "Number of provided children must be 1 or more",
            ));
        }
        if c.threshold < 1 {
            return Err(Error::generic(
                "Parameter 'vote-threshold' expects a value >= 1",
            ));
        }
        if c.threshold as usize > n {
            return Err(Error::generic("threshold may not exceed children count"));
        }
        if c.blkverify && (n != 2 || c.threshold != 2) {
            return Err(Error::generic(
                "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
            ));
        }
        if c.rewrite_corrupted && c.blkverify {
            return Err(Error::generic(
                "rewrite-corrupted=on cannot be used with blkverify=on",
            ));
        }
        let size = children[0].size();
        if let Some(odd) = children.iter().find(|ch| ch.size() != size) {
            return Err(Error::generic(format!(
                "quorum children must have the same size: '{}' has {} bytes, '{}' has {size}",
                odd.name,
                odd.size(),
                children[0].name
            )));
        }
        Ok(QuorumDriver {
            reference,
            children: RwLock::new(children),
            threshold: c.threshold as usize,
            blkverify: c.blkverify,
            rewrite_corrupted: c.rewrite_corrupted,
            events,
        })
    }

    fn children(&self) -> Vec<Arc<Node>> {
        self.children.read().clone()
    }
}

/// What a finished request tells the event stream and its caller.
struct Tally {
    reference: String,
    events: Arc<EventBus>,
    offset: u64,
    len: u64,
}

impl Tally {
    fn report_bad(&self, op: &str, child: &Node, error: Option<&Error>) {
        let (first, count) = sectors(self.offset, self.len);
        let mut data = json!({
            "type": op, "node-name": child.name,
            "sector-num": first, "sectors-count": count,
        });
        if let Some(e) = error {
            data["error"] = json!(e.to_string());
        }
        self.events
            .emit_limited("QUORUM_REPORT_BAD", &child.name, data);
    }

    fn failure(&self, why: String) -> Error {
        let (first, count) = sectors(self.offset, self.len);
        self.events.emit_limited(
            "QUORUM_FAILURE",
            &self.reference,
            json!({"reference": self.reference, "sector-num": first, "sectors-count": count}),
        );
        log::error!(
            "quorum '{}': offset {} length {}: {why}",
            self.reference,
            self.offset,
            self.len
        );
        Error::io(libc::EIO, format!("quorum '{}': {why}", self.reference))
    }

    /// Reports the children that failed; Err unless `threshold` succeeded.
    fn settle<T>(
        &self,
        op: &str,
        children: &[Arc<Node>],
        results: Vec<Result<T>>,
        threshold: usize,
    ) -> Result<Vec<Option<T>>> {
        let mut ok = 0;
        let mut first_err = None;
        let values = results
            .into_iter()
            .zip(children)
            .map(|(r, child)| match r {
                Ok(v) => {
                    ok += 1;
                    Some(v)
                }
                Err(e) => {
                    self.report_bad(op, child, Some(&e));
                    first_err.get_or_insert(e);
                    None
                }
            })
            .collect();
        if ok < threshold {
            let why = format!(
                "{ok} of {} children completed the {op}, vote-threshold is {threshold}{}",
                children.len(),
                first_err.map(|e| format!(" ({e})")).unwrap_or_default()
            );
            return Err(self.failure(why));
        }
        Ok(values)
    }
}

impl QuorumDriver {
    fn tally(&self, offset: u64, len: u64) -> Tally {
        Tally {
            reference: self.reference.clone(),
            events: self.events.clone(),
            offset,
            len,
        }
    }

    /// Runs `op` on every child; succeeds when `threshold` children do.
    fn on_all<T: Send + 'static>(
        &self,
        kind: &'static str,
        offset: u64,
        len: u64,
        start: impl Fn(&Node, Done<T>),
        done: Done<Vec<Option<T>>>,
    ) {
        let children = self.children();
        let tally = self.tally(offset, len);
        let threshold = self.threshold;
        let cs = children.clone();
        fanout::all(
            children.len(),
            |i, d| start(&children[i], d),
            move |results| done(tally.settle(kind, &cs, results, threshold)),
        );
    }
}

/// Children grouped by identical content, the largest group first; on a
/// tie the group seen last first, as QEMU picks its winner (new versions go
/// to the head of its list, and a later one needs more votes to lose).
fn versions(bufs: &[Option<Buf>]) -> Vec<Vec<usize>> {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, b) in bufs.iter().enumerate() {
        let Some(b) = b else { continue };
        match groups
            .iter_mut()
            .find(|g| bufs[g[0]].as_deref() == Some(&b[..]))
        {
            Some(g) => g.push(i),
            None => groups.push(vec![i]),
        }
    }
    groups.reverse();
    // Stable: equal counts keep that order.
    groups.sort_by_key(|g| std::cmp::Reverse(g.len()));
    groups
}

impl Driver for QuorumDriver {
    fn format_name(&self) -> &'static str {
        "quorum"
    }

    fn size(&self) -> u64 {
        self.children.read().first().map_or(0, |c| c.size())
    }

    fn read(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let len = buf.len();
        let children = self.children();
        let tally = self.tally(offset, len as u64);
        let (threshold, blkverify, rewrite) =
            (self.threshold, self.blkverify, self.rewrite_corrupted);
        let cs = children.clone();
        fanout::all(
            children.len(),
            |i, d| children[i].read(offset, Buf::recycled(len), d),
            move |results| {
                let mut bufs = match tally.settle("read", &cs, results, threshold) {
                    Ok(b) => b,
                    Err(e) => return done(Err(e)),
                };
                let groups = versions(&bufs);
                let winner = &groups[0];
                if blkverify && groups.len() > 1 {
                    let a = bufs[groups[0][0]].as_deref().unwrap_or_default();
                    let b = bufs[groups[1][0]].as_deref().unwrap_or_default();
                    let at = fanout::first_difference(a, b).unwrap_or(0);
                    log::error!(
                        "quorum '{}' (blkverify): read offset={offset} bytes={len} contents mismatch at offset {}",
                        tally.reference,
                        offset + at as u64
                    );
                    return done(Err(tally.failure(format!(
                        "blkverify: contents mismatch at offset {}",
                        offset + at as u64
                    ))));
                }
                if winner.len() < threshold {
                    let why = format!(
                        "no {threshold} children agree on the data (the largest group has {})",
                        winner.len()
                    );
                    return done(Err(tally.failure(why)));
                }
                let losers: Vec<usize> = groups[1..].iter().flatten().copied().collect();
                for &i in &losers {
                    tally.report_bad("read", &cs[i], None);
                }
                // The winner's own buffer goes back: no copy.
                let Some(out) = bufs[winner[0]].take() else {
                    return done(Err(Error::io(libc::EIO, "quorum: read buffer lost")));
                };
                if !rewrite || losers.is_empty() {
                    return done(Ok(out));
                }
                // The read completes once the bad copies are repaired.
                let fixes: Vec<Arc<Node>> = losers.iter().map(|&i| cs[i].clone()).collect();
                let data = Buf::from_slice(&out);
                let fixed = fixes.clone();
                // Not from this completion: a child's write may wait for
                // its metadata, which a completion thread must not.
                crate::io::spawn_blocking(move || {
                    fanout::all(
                        fixes.len(),
                        |i, d| fixes[i].write(offset, Buf::from_slice(&data), d),
                        move |results| {
                            for (r, child) in results.iter().zip(&fixed) {
                                if let Err(e) = r {
                                    log::warn!(
                                        "quorum '{}': rewriting '{}' at {offset}: {e}",
                                        tally.reference,
                                        child.name
                                    );
                                }
                            }
                            done(Ok(out))
                        },
                    )
                });
            },
        );
    }

    fn write(&self, offset: u64, buf: Buf, done: Done<Buf>) {
        let len = buf.len();
        let data = Arc::new(buf);
        let d = data.clone();
        self.on_all(
            "write",
            offset,
            len as u64,
            move |child, cb| child.write(offset, Buf::from_slice(&d), cb),
            Box::new(move |r| {
                done(r.map(|_| Arc::try_unwrap(data).unwrap_or_else(|d| Buf::from_slice(&d))))
            }),
        );
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool, done: Done<()>) {
        self.on_all(
            "write",
            offset,
            len,
            move |child, cb| child.write_zeroes(offset, len, unmap, cb),
            Box::new(move |r| done(r.map(|_| ()))),
        );
    }

    /// A hint QEMU's quorum does not pass on: children would then read
    /// back differently and every later read would vote them bad.
    fn discard(&self, _offset: u64, _len: u64, done: Done<()>) {
        done(Ok(()))
    }

    fn flush(&self, done: Done<()>) {
        self.on_all(
            "flush",
            0,
            0,
            |child, cb| child.flush(cb),
            Box::new(move |r| done(r.map(|_| ()))),
        );
    }

    fn block_status(&self, _offset: u64, len: u64) -> Result<Status> {
        Ok(Status::data(len, None))
    }

    fn filename(&self) -> String {
        let names: Vec<String> = self
            .children
            .read()
            .iter()
            .map(|c| c.driver.filename())
            .collect();
        let spec = json!({"driver": "quorum", "vote-threshold": self.threshold, "children": names});
        format!("json:{spec}")
    }

    fn other_children(&self) -> Vec<Arc<Node>> {
        self.children()
    }

    fn replace_child(&self, old: &Arc<Node>, new: Arc<Node>) -> Result<()> {
        let mut children = self.children.write();
        let slot = children
            .iter_mut()
            .find(|c| Arc::ptr_eq(c, old))
            .ok_or_else(|| {
                Error::generic(format!("Node '{}' is not a child of the quorum", old.name))
            })?;
        if new.size() != old.size() {
            return Err(Error::generic(format!(
                "the new child '{}' has {} bytes, the quorum's children {}",
                new.name,
                new.size(),
                old.size()
            )));
        }
        *slot = new;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &[u8]) -> Option<Buf> {
        Some(Buf::from_slice(s))
    }

    #[test]
    fn the_largest_group_wins_and_ties_go_to_the_last_version() {
        let g = versions(&[b(b"x"), b(b"y"), b(b"y"), None]);
        assert_eq!(g, vec![vec![1, 2], vec![0]]);
        let g = versions(&[b(b"x"), b(b"y")]);
        assert_eq!(g, vec![vec![1], vec![0]]);
        let g = versions(&[b(b"x"), b(b"y"), b(b"x"), b(b"z"), b(b"y")]);
        assert_eq!(g, vec![vec![1, 4], vec![0, 2], vec![3]]);
        let g = versions(&[None, b(b"z"), b(b"z")]);
        assert_eq!(g, vec![vec![1, 2]]);
    }
}
