//! Splitting a guest range into segments by how its clusters map, for the
//! cluster-mapped formats (qcow, qcow2).

use crate::error::Result;

/// What planning needs to know about a format's mapping of one guest cluster.
pub(crate) trait ClusterMapping: Copy {
    /// The mapping of the byte `by` bytes into the cluster: data mappings
    /// move their host offset, the others stay as they are.
    fn offset_by(self, by: u64) -> Self;
    /// Whether `next` extends a segment of `len` bytes mapped by `self`
    /// (contiguous data, or the same kind of unallocated run).
    fn continues(&self, len: usize, next: &Self) -> bool;
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

/// The segments of `offset..offset+len`, walked cluster by cluster with
/// `lookup` (given the guest cluster index) and merged where
/// [`ClusterMapping::continues`] allows; stops once `max` segments are complete.
pub(crate) fn plan<M: ClusterMapping>(
    offset: u64,
    len: usize,
    cluster_size: u64,
    max: usize,
    mut lookup: impl FnMut(u64) -> Result<M>,
) -> Result<Vec<Segment<M>>> {
    let mut segs: Vec<Segment<M>> = Vec::new();
    let mut at = 0usize;
    while at < len {
        let guest = offset + at as u64;
        let in_cluster = guest % cluster_size;
        let n = ((cluster_size - in_cluster) as usize).min(len - at);
        let map = lookup(guest / cluster_size)?.offset_by(in_cluster);
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
    }

    /// Clusters 0-1 contiguous data, 2-3 holes, 4 data elsewhere.
    fn lookup(c: u64) -> Result<Option<u64>> {
        Ok(match c {
            0 | 1 => Some(0x1000 + c * 16),
            4 => Some(0x9000),
            _ => None,
        })
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
    fn lookup_errors_propagate() {
        let r = plan(0, 64, 16, usize::MAX, |c| match c {
            2 => Err(crate::Error::generic("bad table")),
            _ => Ok(None),
        });
        assert!(r.is_err());
    }
}
