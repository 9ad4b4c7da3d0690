//! The image plan: every byte range of the disk and where its bytes come
//! from. The metadata (MBR, boot sectors, FATs, directories) is built here
//! once and kept in memory; a file's clusters are one contiguous run
//! that maps to the host file; anything else (free clusters, gaps) reads
//! as zeroes.

use super::boot;
use super::dirent::{self, DirName, Short, Times, ATTR_ARCHIVE, ATTR_DIR, ATTR_VOLUME, ENTRY};
use super::geometry::{human, Geometry, BACKUP_BOOT_SECTOR, FSINFO_SECTOR, SECTOR};
use super::scan::{self, Budget, Entry, Kind, MAX_DIR_ENTRIES};
use crate::error::{Error, Result};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Source {
    /// Bytes of [`Plan::meta`] from this index.
    Meta(usize),
    /// [`Plan::files`] entry: bytes from the host file's start.
    File(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Region {
    pub start: u64,
    pub len: u64,
    pub source: Source,
}

#[derive(Debug)]
pub(super) struct HostFile {
    pub path: PathBuf,
    /// The size at open: the directory entry says so, bytes past it read as zeroes.
    pub size: u64,
}

pub(super) struct Plan {
    pub geometry: Geometry,
    pub meta: Vec<u8>,
    /// Sorted by start, never overlapping.
    pub regions: Vec<Region>,
    pub files: Vec<HostFile>,
}

/// End-of-chain value of a FAT of `bits`.
fn end_of_chain(bits: u32) -> u32 {
    match bits {
        12 => 0xfff,
        16 => 0xffff,
        _ => 0x0fff_ffff,
    }
}

/// Sets FAT entry `cluster` of a FAT of `bits` (12-bit entries share bytes).
pub(super) fn fat_set(fat: &mut [u8], bits: u32, cluster: u32, value: u32) {
    let c = cluster as usize;
    match bits {
        12 => {
            let at = c * 3 / 2;
            let pair = u16::from_le_bytes([fat[at], fat[at + 1]]);
            let v = (value & 0xfff) as u16;
            let pair = if c.is_multiple_of(2) {
                (pair & 0xf000) | v
            } else {
                (pair & 0x000f) | (v << 4)
            };
            fat[at..at + 2].copy_from_slice(&pair.to_le_bytes());
        }
        16 => fat[c * 2..c * 2 + 2].copy_from_slice(&(value as u16).to_le_bytes()),
        _ => fat[c * 4..c * 4 + 4].copy_from_slice(&(value & 0x0fff_ffff).to_le_bytes()),
    }
}

/// Clusters handed out in order, each file or directory one run.
struct Builder<'a> {
    g: &'a Geometry,
    /// Next free cluster; may run past the disk, checked once the tree is placed.
    next: u64,
    chains: Vec<(u32, u32)>,
    dirs: Vec<(u32, Vec<u8>)>,
    files: Vec<(u32, u32, HostFile)>,
}

impl Builder<'_> {
    fn alloc(&mut self, clusters: u64) -> u32 {
        let first = self.next;
        self.next += clusters;
        let (first, n) = (clamp32(first), clamp32(clusters));
        self.chains.push((first, n));
        first
    }

    /// Places directory `path` (its clusters, then its entries' clusters,
    /// depth first) and returns its first cluster: 0 for a FAT12/16 root,
    /// which lives in its fixed area, written to `root`.
    fn dir(
        &mut self,
        path: &Path,
        entries: &[Entry],
        times: Times,
        parent: Option<(u32, Times)>,
        root: &mut Vec<u8>,
    ) -> Result<u32> {
        let mut taken = HashSet::new();
        let names: Vec<DirName> = entries
            .iter()
            .map(|e| dirent::dir_name(&e.name, &mut taken))
            .collect::<Result<_>>()
            .map_err(|e| e.context(format!("vvfat: directory '{}'", path.display())))?;
        // A label in the root, "." and ".." elsewhere.
        let slots =
            names.iter().map(DirName::slots).sum::<usize>() + 2 - usize::from(parent.is_none());
        if slots > MAX_DIR_ENTRIES {
            return Err(Error::generic(format!(
                "vvfat: directory '{}' needs {slots} directory entries (long names take several), more than the {MAX_DIR_ENTRIES} a FAT directory can hold",
                path.display()
            )));
        }
        let fixed_root = parent.is_none() && self.g.fat_bits != 32;
        let bytes = (slots * ENTRY) as u64;
        let first = if fixed_root {
            let max = self.g.root_entries as usize;
            if slots > max {
                return Err(Error::generic(format!(
                    "vvfat: directory '{}' does not fit: its top level needs {slots} directory entries (long names take several), the root directory of FAT{} holds {max}",
                    path.display(),
                    self.g.fat_bits
                )));
            }
            0
        } else {
            self.alloc(bytes.div_ceil(self.g.cluster_size()).max(1))
        };
        let cs = self.g.cluster_size();
        let mut firsts = Vec::with_capacity(entries.len());
        for e in entries {
            firsts.push(match &e.kind {
                Kind::File { size: 0, .. } => 0,
                Kind::File { path, size } => {
                    let n = size.div_ceil(cs);
                    let first = self.alloc(n);
                    let file = HostFile {
                        path: path.clone(),
                        size: *size,
                    };
                    self.files.push((first, clamp32(n), file));
                    first
                }
                // ".." of a top-level directory says 0, whatever the root's cluster.
                Kind::Dir { path, entries } => {
                    let up = if parent.is_none() { 0 } else { first };
                    self.dir(path, entries, e.times, Some((up, times)), root)?
                }
            });
        }
        let mut out = Vec::with_capacity(bytes as usize);
        let short = |name, attr, cluster, size, times| Short {
            name,
            attr,
            cluster,
            size,
            times,
        };
        match parent {
            None => dirent::push_entries(
                &mut out,
                None,
                &short(boot::LABEL, ATTR_VOLUME, 0, 0, times),
            ),
            Some((up, up_times)) => {
                dirent::push_entries(
                    &mut out,
                    None,
                    &short(b".          ", ATTR_DIR, first, 0, times),
                );
                dirent::push_entries(
                    &mut out,
                    None,
                    &short(b"..         ", ATTR_DIR, up, 0, up_times),
                );
            }
        }
        for ((e, name), &cluster) in entries.iter().zip(&names).zip(&firsts) {
            let (attr, size) = match &e.kind {
                Kind::File { size, .. } => (ATTR_ARCHIVE, *size),
                Kind::Dir { .. } => (ATTR_DIR, 0),
            };
            let size = u32::try_from(size).map_err(|_| {
                Error::generic(format!(
                    "vvfat: '{}/{}' is larger than the 4 GiB - 1 a FAT file can hold",
                    path.display(),
                    e.name
                ))
            })?;
            let s = short(&name.short, attr, cluster, size, e.times);
            dirent::push_entries(&mut out, name.long.as_deref(), &s);
        }
        if fixed_root {
            out.resize(self.g.root_entries as usize * ENTRY, 0);
            *root = out;
        } else {
            out.resize(out.len().next_multiple_of(cs as usize), 0);
            self.dirs.push((first, out));
        }
        Ok(first)
    }
}

fn clamp32(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The error for a tree that needs `clusters` data clusters (`at_least`:
/// counted before the walk ended).
fn too_big(dir: &Path, g: &Geometry, clusters: u64, at_least: bool) -> Error {
    let cs = g.cluster_size();
    Error::generic(format!(
        "vvfat: directory '{}' does not fit on a {}: its files and directories need {}{} clusters of {cs} bytes ({}), the file system has {} ({})",
        dir.display(),
        g.describe(),
        if at_least { "at least " } else { "" },
        clusters,
        human(clusters * cs),
        g.data_clusters,
        human(u64::from(g.data_clusters) * cs),
    ))
}

/// Builds the plan of the image of directory `dir`.
pub(super) fn build(dir: &Path, g: Geometry) -> Result<Plan> {
    let (dir_c, g_c) = (dir.to_path_buf(), g);
    let mut budget = Budget::new(
        g.cluster_size(),
        u64::from(g.data_clusters),
        Box::new(move |n| too_big(&dir_c, &g_c, n, true)),
    );
    let (times, entries) = scan::scan(dir, &mut budget)?;
    plan(dir, g, times, &entries)
}

/// The plan of a scanned tree.
fn plan(dir: &Path, g: Geometry, times: Times, entries: &[Entry]) -> Result<Plan> {
    let mut b = Builder {
        g: &g,
        next: 2,
        chains: Vec::new(),
        dirs: Vec::new(),
        files: Vec::new(),
    };
    let mut root = Vec::new();
    b.dir(dir, entries, times, None, &mut root)?;
    let used = b.next - 2;
    if used > u64::from(g.data_clusters) {
        // Only the exact count knows the directories' long names.
        return Err(too_big(dir, &g, used, false));
    }
    let mut fat = vec![0u8; g.fat_bytes() as usize];
    let eoc = end_of_chain(g.fat_bits);
    fat_set(
        &mut fat,
        g.fat_bits,
        0,
        (eoc & !0xff) | u32::from(boot::media(&g)),
    );
    fat_set(&mut fat, g.fat_bits, 1, eoc);
    for &(first, n) in &b.chains {
        for c in first..first + n - 1 {
            fat_set(&mut fat, g.fat_bits, c, c + 1);
        }
        fat_set(&mut fat, g.fat_bits, first + n - 1, eoc);
    }

    let mut p = Plan {
        geometry: g,
        meta: Vec::new(),
        regions: Vec::new(),
        files: Vec::new(),
    };
    let part = u64::from(g.partition_start) * SECTOR;
    if !g.floppy {
        p.add_meta(0, &boot::mbr(&g));
    }
    let boot_sector = boot::boot_sector(&g);
    p.add_meta(part, &boot_sector);
    if g.fat_bits == 32 {
        let free = g.data_clusters - used as u32;
        let next_free = if free > 0 { 2 + used as u32 } else { u32::MAX };
        let info = boot::fsinfo(free, next_free);
        p.add_meta(part + u64::from(FSINFO_SECTOR) * SECTOR, &info);
        let backup = part + u64::from(BACKUP_BOOT_SECTOR) * SECTOR;
        p.add_meta(backup, &boot_sector);
        p.add_meta(backup + SECTOR, &info);
    }
    // Both FATs read the same bytes.
    let at = p.meta.len();
    p.meta.extend_from_slice(&fat);
    for n in 0..2 {
        p.regions.push(Region {
            start: g.fat_offset(n),
            len: fat.len() as u64,
            source: Source::Meta(at),
        });
    }
    if !root.is_empty() {
        p.add_meta(g.root_offset(), &root);
    }
    for (first, bytes) in &b.dirs {
        p.add_meta(g.cluster_offset(*first), bytes);
    }
    for (first, n, file) in b.files {
        p.regions.push(Region {
            start: g.cluster_offset(first),
            len: u64::from(n) * g.cluster_size(),
            source: Source::File(p.files.len()),
        });
        p.files.push(file);
    }
    p.regions.sort_by_key(|r| r.start);
    Ok(p)
}

impl Plan {
    fn add_meta(&mut self, start: u64, bytes: &[u8]) {
        self.regions.push(Region {
            start,
            len: bytes.len() as u64,
            source: Source::Meta(self.meta.len()),
        });
        self.meta.extend_from_slice(bytes);
    }

    /// The region holding `pos`, or the gap up to the next one: (region,
    /// bytes from `pos` within it or the gap).
    pub fn at(&self, pos: u64) -> (Option<&Region>, u64) {
        let end = self.geometry.size();
        let i = self.regions.partition_point(|r| r.start <= pos);
        if i > 0 {
            let r = &self.regions[i - 1];
            if pos < r.start + r.len {
                return (Some(r), r.start + r.len - pos);
            }
        }
        let next = self.regions.get(i).map_or(end, |r| r.start);
        (None, next.saturating_sub(pos).max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fat_get(fat: &[u8], bits: u32, c: u32) -> u32 {
        let c = c as usize;
        match bits {
            12 => {
                let pair = u16::from_le_bytes([fat[c * 3 / 2], fat[c * 3 / 2 + 1]]);
                u32::from(if c.is_multiple_of(2) {
                    pair & 0xfff
                } else {
                    pair >> 4
                })
            }
            16 => u32::from(u16::from_le_bytes([fat[c * 2], fat[c * 2 + 1]])),
            _ => u32::from_le_bytes([fat[c * 4], fat[c * 4 + 1], fat[c * 4 + 2], fat[c * 4 + 3]]),
        }
    }

    fn file(name: &str, size: u64) -> Entry {
        Entry {
            name: name.into(),
            times: Times::default(),
            kind: Kind::File {
                path: PathBuf::from(name),
                size,
            },
        }
    }

    fn dir(name: &str, entries: Vec<Entry>) -> Entry {
        Entry {
            name: name.into(),
            times: Times::default(),
            kind: Kind::Dir {
                path: PathBuf::from(name),
                entries,
            },
        }
    }

    /// The bytes of the image at `start`, through the plan.
    fn bytes(p: &Plan, start: u64, len: usize) -> Vec<u8> {
        let (r, _) = p.at(start);
        let r = r.expect("a region");
        match r.source {
            Source::Meta(at) => p.meta[at + (start - r.start) as usize..][..len].to_vec(),
            Source::File(_) => panic!("file data"),
        }
    }

    #[test]
    fn twelve_bit_entries_share_bytes() {
        let mut fat = vec![0u8; 6];
        fat_set(&mut fat, 12, 2, 0xabc);
        fat_set(&mut fat, 12, 3, 0x123);
        assert_eq!(&fat[3..6], &[0xbc, 0x3a, 0x12]);
        assert_eq!(fat_get(&fat, 12, 2), 0xabc);
        assert_eq!(fat_get(&fat, 12, 3), 0x123);
    }

    #[test]
    fn chains_directories_and_dot_entries() {
        for (t, floppy) in [(Some(12), true), (None, false), (Some(32), false)] {
            let g = Geometry::new(t, floppy).unwrap();
            let cs = g.cluster_size();
            let tree = vec![
                file("a.bin", 2 * cs + 1),
                dir("d", vec![file("b.bin", cs), file("empty", 0)]),
            ];
            let p = plan(Path::new("/x"), g, Times::default(), &tree).unwrap();
            let bits = g.fat_bits;
            let fat = bytes(&p, g.fat_offset(0), g.fat_bytes() as usize);
            assert_eq!(fat, bytes(&p, g.fat_offset(1), fat.len()), "FATs differ");
            assert_eq!(fat_get(&fat, bits, 0) & 0xff, u32::from(boot::media(&g)));
            let eoc = end_of_chain(bits);
            // FAT32: the root directory is cluster 2; FAT12/16 start files there.
            let a: u32 = if bits == 32 { 3 } else { 2 };
            if bits == 32 {
                assert_eq!(fat_get(&fat, bits, 2), eoc);
            }
            assert_eq!(fat_get(&fat, bits, a), a + 1);
            assert_eq!(fat_get(&fat, bits, a + 1), a + 2);
            assert_eq!(fat_get(&fat, bits, a + 2), eoc);
            let (d, b) = (a + 3, a + 4);
            assert_eq!(fat_get(&fat, bits, d), eoc);
            assert_eq!(fat_get(&fat, bits, b), eoc);
            assert_eq!(fat_get(&fat, bits, b + 1), 0);
            // "." is the directory, ".." the root (always 0), then b.bin.
            let sub = bytes(&p, g.cluster_offset(d), cs as usize);
            let first = |e: &[u8]| {
                u32::from(u16::from_le_bytes([e[26], e[27]]))
                    | u32::from(u16::from_le_bytes([e[20], e[21]])) << 16
            };
            assert_eq!(&sub[..11], b".          ");
            assert_eq!(first(&sub[..32]), d);
            assert_eq!(&sub[32..43], b"..         ");
            assert_eq!(first(&sub[32..64]), 0);
            // b.bin: one long name entry, then its short entry.
            assert_eq!(first(&sub[96..128]), b);
            assert_eq!(&sub[96..107], b"B       BIN");
            // Regions are sorted, disjoint and inside the disk.
            for w in p.regions.windows(2) {
                assert!(w[0].start + w[0].len <= w[1].start, "{w:?}");
            }
            let last = p.regions.last().unwrap();
            assert!(last.start + last.len <= g.size());
            assert_eq!(p.at(g.cluster_offset(a)).0.unwrap().source, Source::File(0));
            assert_eq!(p.at(g.cluster_offset(b)).0.unwrap().source, Source::File(1));
        }
    }

    #[test]
    fn overflow_is_an_error_naming_the_directory() {
        let g = Geometry::new(Some(12), true).unwrap();
        let tree = vec![file("big", 2 << 20)];
        let e = plan(Path::new("/data/dir"), g, Times::default(), &tree)
            .err()
            .unwrap();
        assert!(
            e.msg
                .contains("'/data/dir' does not fit on a FAT12 floppy (1440 KiB)"),
            "{e}"
        );
        // Many long names overflow the fixed root directory first.
        let g = Geometry::new(None, false).unwrap();
        let tree: Vec<Entry> = (0..300)
            .map(|i| file(&format!("file number {i}"), 1))
            .collect();
        let e = plan(Path::new("/d"), g, Times::default(), &tree)
            .err()
            .unwrap();
        assert!(e.msg.contains("root directory of FAT16 holds 512"), "{e}");
        // FAT32 has no fixed root: the same tree fits.
        let g = Geometry::new(Some(32), false).unwrap();
        assert!(plan(Path::new("/d"), g, Times::default(), &tree).is_ok());
    }
}
