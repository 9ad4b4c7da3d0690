//! Reads that fall through to a backing file, shared by the copy-on-write formats.

use super::Done;
use crate::graph::Node;
use crate::io::Buf;
use std::sync::Arc;

/// Reads the guest range from the backing chain; zeroes where there is no
/// backing file or past its end.
pub fn read(backing: Option<&Arc<Node>>, guest: u64, buf: Buf, done: Done<Buf>) {
    let Some(b) = backing else {
        let mut buf = buf;
        buf.fill(0);
        return done(Ok(buf));
    };
    let bsize = b.size();
    if guest >= bsize {
        let mut buf = buf;
        buf.fill(0);
        return done(Ok(buf));
    }
    let avail = (bsize - guest).min(buf.len() as u64) as usize;
    if avail == buf.len() {
        return b.read(guest, buf, done);
    }
    let mut out = buf;
    b.read(
        guest,
        Buf::recycled(avail),
        Box::new(move |r| {
            done(r.map(|part| {
                out[..avail].copy_from_slice(&part);
                out[avail..].fill(0);
                out
            }))
        }),
    );
}
