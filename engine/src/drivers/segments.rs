//! Splitting a guest range into segments by how its clusters map, for the
//! cluster-mapped formats (qcow, qcow2).

use super::Status;
use crate::error::{Error, Result};
use smallvec::SmallVec;

/// A plan: most requests are one segment, held inline (no allocation).
pub(crate) type Segments<M> = SmallVec<[Segment<M>; 1]>;

/// What planning needs to know about a format's mapping of one guest cluster.
pub(crate) trait ClusterMapping: Copy {
    /// The mapping of the byte `by` bytes into the cluster: data mappings
    /// move their host offset, the others stay as they are.
    fn offset_by(self, by: u64) -> Self;
    /// Whether `next` extends a segment of `len` bytes mapped by `self`
    /// (contiguous data, or the same kind of unallocated run).
    fn continues(&self, len: usize, next: &Self) -> bool;
    /// What this layer says of the clusters it maps so.
    fn status(&self, has_backing: bool) -> LayerStatus;
}

/// (data, zero, host offset, allocated): [`Status`] without its length.
pub(crate) type LayerStatus = (bool, bool, Option<u64>, bool);

/// `Driver::block_status` of a cluster-mapped format: the first segment at
/// `offset` (at most `len` bytes, none past `size`), as `plan_first` finds
/// it for a range length. Host offsets are hidden when `hide_offset` (the
/// data there is encrypted, no use to a reader of the file).
pub(crate) fn block_status<M: ClusterMapping>(
    size: u64,
    offset: u64,
    len: u64,
    has_backing: bool,
    hide_offset: bool,
    plan_first: impl FnOnce(u64) -> Result<Segments<M>>,
) -> Result<Status> {
    let len = super::status_len(offset, len, size)?;
    let seg = *plan_first(len)?
        .first()
        .ok_or_else(|| Error::io(libc::EIO, "empty block status"))?;
    let (data, zero, offset, allocated) = seg.map.status(has_backing);
    Ok(Status {
        len: seg.len as u64,
        data,
        zero,
        offset: offset.filter(|_| !hide_offset),
        allocated,
    })
}

/// One piece of a request, in guest order.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Segment<M> {
    /// Offset inside the request.
    pub at: usize,
    pub len: usize,
    pub guest: u64,
    /// For data: the host offset of `guest` itself.
    pub map: M,
}

/// The segments of `offset..offset+len`, walked with `lookup` (given the
/// guest cluster index, it answers the mapping and how many clusters from
/// that one map the same way with no offset to move: 1 for data, a whole
/// unallocated table's span at once) and merged where
/// [`ClusterMapping::continues`] allows; stops once `max` segments are complete.
pub(crate) fn plan<M: ClusterMapping>(
    offset: u64,
    len: usize,
    cluster_size: u64,
    max: usize,
    mut lookup: impl FnMut(u64) -> Result<(M, u64)>,
) -> Result<Segments<M>> {
    let mut segs = Segments::<M>::new();
    let mut at = 0usize;
    while at < len {
        let guest = offset + at as u64;
        let in_cluster = guest % cluster_size;
        let (map, run) = lookup(guest / cluster_size)?;
        let span = (cluster_size - in_cluster).saturating_add((run.max(1) - 1) * cluster_size);
        let n = usize::try_from(span).unwrap_or(usize::MAX).min(len - at);
        let map = map.offset_by(in_cluster);
        if let Some(last) = segs.last_mut() {
            if last.map.continues(last.len, &map) {
                last.len += n;
                at += n;
                continue;
            }
        }
        if segs.len() == max {
            break;
        }
        segs.push(Segment {
            at,
            len: n,
            guest,
            map,
        });
        at += n;
    }
    Ok(segs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal mapping: `Some(host)` is data, `None` a hole.
    impl ClusterMapping for Option<u64> {
        fn offset_by(self, by: u64) -> Self {
            self.map(|h| h + by)
        }
        fn continues(&self, len: usize, next: &Self) -> bool {
            match (*self, *next) {
                (Some(h1), Some(h2)) => h1 + len as u64 == h2,
                (a, b) => a.is_none() && b.is_none(),
            }
        }
        fn status(&self, has_backing: bool) -> LayerStatus {
            (
                self.is_some(),
                self.is_none() && !has_backing,
                *self,
                self.is_some(),
            )
        }
    }

    /// Clusters 0-1 contiguous data, 2-3 holes, 4 data elsewhere.
    fn lookup(c: u64) -> Result<(Option<u64>, u64)> {
        Ok(match c {
            0 | 1 => (Some(0x1000 + c * 16), 1),
            4 => (Some(0x9000), 1),
            _ => (None, 1),
        })
    }

    #[test]
    fn a_run_of_holes_is_one_lookup() {
        let mut calls = 0;
        // Clusters 0..1000 unallocated in one answer, then data.
        let segs = plan(8, 16 * 1000 + 8, 16, usize::MAX, |c| {
            calls += 1;
            Ok(if c < 1000 {
                (None, 1000 - c)
            } else {
                (Some(0x100), 1)
            })
        })
        .unwrap();
        assert_eq!(calls, 2);
        assert_eq!(
            runs(&segs),
            [
                (0, 16 * 1000 - 8, 8, None),
                (16 * 1000 - 8, 16, 16000, Some(0x100))
            ]
        );
    }

    fn runs(segs: &[Segment<Option<u64>>]) -> Vec<(usize, usize, u64, Option<u64>)> {
        segs.iter().map(|s| (s.at, s.len, s.guest, s.map)).collect()
    }

    #[test]
    fn merges_contiguous_data_and_holes() {
        let segs = plan(4, 70, 16, usize::MAX, lookup).unwrap();
        assert_eq!(
            runs(&segs),
            [
                (0, 28, 4, Some(0x1004)),
                (28, 32, 32, None),
                (60, 10, 64, Some(0x9000)),
            ]
        );
    }

    #[test]
    fn stops_after_max_segments() {
        let segs = plan(4, 70, 16, 1, lookup).unwrap();
        assert_eq!(runs(&segs), [(0, 28, 4, Some(0x1004))]);
    }

    #[test]
    fn block_status_of_the_first_segment() {
        let first = |n: u64| plan(4, n as usize, 16, 1, lookup);
        let st = block_status(100, 4, 200, false, false, first).unwrap();
        assert_eq!((st.len, st.data, st.offset), (28, true, Some(0x1004)));
        let st = block_status(100, 4, 200, false, true, first).unwrap();
        assert_eq!(st.offset, None);
        let e = block_status(100, 100, 8, false, false, first).unwrap_err();
        assert_eq!(e.errno(), libc::ENXIO);
    }

    #[test]
    fn lookup_errors_propagate() {
        let r = plan(0, 64, 16, usize::MAX, |c| match c {
            2 => Err(crate::Error::generic("bad table")),
            _ => Ok((None, 1)),
        });
        assert!(r.is_err());
    }
}
