//! Reads the host directory tree the image exports. Symbolic links are
//! followed, as QEMU's `stat` does; a dangling link, a link back to one of
//! its own ancestor directories, and anything that is neither a regular
//! file nor a directory (FIFOs, sockets, devices) are skipped with a
//! warning. Every file is opened once here, so one the daemon cannot read
//! fails the open, naming it, instead of failing a guest read later.

use super::dirent::{fat_date_time, Times};
use crate::error::{Error, Result};
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Directory entries a FAT directory may hold (2 MiB of 32-byte entries).
pub(super) const MAX_DIR_ENTRIES: usize = 65536;
/// Nesting the walk accepts: far beyond what DOS paths reach, and a bound
/// on the recursion here and in the layout.
const MAX_DEPTH: usize = 128;

pub(super) struct Entry {
    pub name: String,
    pub times: Times,
    pub kind: Kind,
}

pub(super) enum Kind {
    File { path: PathBuf, size: u64 },
    Dir { path: PathBuf, entries: Vec<Entry> },
}

/// Stops the walk of a tree that cannot fit: `clusters` bounds from below
/// what the tree needs (a cluster per directory, whole clusters per file).
pub(super) struct Budget {
    pub cluster_size: u64,
    pub clusters: u64,
    used: u64,
    /// Builds the error that names the exported directory and the disk.
    pub too_big: Box<dyn Fn(u64) -> Error>,
}

impl Budget {
    pub fn new(cluster_size: u64, clusters: u64, too_big: Box<dyn Fn(u64) -> Error>) -> Budget {
        Budget {
            cluster_size,
            clusters,
            used: 0,
            too_big,
        }
    }

    fn spend(&mut self, clusters: u64) -> Result<()> {
        self.used += clusters;
        if self.used > self.clusters {
            return Err((self.too_big)(self.used));
        }
        Ok(())
    }
}

/// The root directory's times and entries, sorted by name (QEMU lists them
/// in `readdir` order; sorting makes the image the same on every open).
pub(super) fn scan(root: &Path, budget: &mut Budget) -> Result<(Times, Vec<Entry>)> {
    let meta = std::fs::metadata(root).map_err(|e| {
        Error::from_io(
            &e,
            format!("vvfat: cannot open directory '{}'", root.display()),
        )
    })?;
    if !meta.is_dir() {
        return Err(Error::generic(format!(
            "vvfat: '{}' is not a directory",
            root.display()
        )));
    }
    let mut ancestors = vec![(meta.dev(), meta.ino())];
    let entries = read_dir(root, &mut ancestors, budget)?;
    Ok((times(&meta), entries))
}

pub(super) fn times(m: &Metadata) -> Times {
    Times {
        modified: fat_date_time(m.mtime()),
        created: fat_date_time(m.ctime()),
        accessed: fat_date_time(m.atime()).0,
    }
}

fn read_dir(
    dir: &Path,
    ancestors: &mut Vec<(u64, u64)>,
    budget: &mut Budget,
) -> Result<Vec<Entry>> {
    let cannot = |e: std::io::Error| {
        Error::from_io(
            &e,
            format!("vvfat: cannot read directory '{}'", dir.display()),
        )
    };
    let mut out = Vec::new();
    for item in std::fs::read_dir(dir).map_err(cannot)? {
        let item = item.map_err(cannot)?;
        let path = item.path();
        let Some(name) = item.file_name().to_str().map(str::to_string) else {
            return Err(Error::generic(format!(
                "vvfat: '{}': the name is not valid UTF-8, which a FAT long name cannot hold",
                path.display()
            )));
        };
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            // A link to nothing, or to itself through others, as QEMU skips a failed stat.
            Err(e)
                if e.kind() == std::io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ELOOP) =>
            {
                log::warn!(
                    "vvfat: skipping '{}': dangling symbolic link ({e})",
                    path.display()
                );
                continue;
            }
            Err(e) => {
                return Err(Error::from_io(
                    &e,
                    format!("vvfat: cannot stat '{}'", path.display()),
                ))
            }
        };
        let kind = if meta.is_dir() {
            let id = (meta.dev(), meta.ino());
            if ancestors.contains(&id) {
                log::warn!(
                    "vvfat: skipping '{}': a symbolic link back to one of its own parent directories",
                    path.display()
                );
                continue;
            }
            if ancestors.len() >= MAX_DEPTH {
                return Err(Error::generic(format!(
                    "vvfat: '{}' is nested more than {MAX_DEPTH} directories deep",
                    path.display()
                )));
            }
            budget.spend(1)?;
            ancestors.push(id);
            let entries = read_dir(&path, ancestors, budget);
            ancestors.pop();
            Kind::Dir {
                path,
                entries: entries?,
            }
        } else if meta.is_file() {
            std::fs::File::open(&path).map_err(|e| {
                Error::from_io(&e, format!("vvfat: cannot read '{}'", path.display()))
            })?;
            let size = meta.len();
            budget.spend(size.div_ceil(budget.cluster_size))?;
            Kind::File { path, size }
        } else {
            log::warn!(
                "vvfat: skipping '{}': neither a regular file nor a directory",
                path.display()
            );
            continue;
        };
        out.push(Entry {
            name,
            times: times(&meta),
            kind,
        });
        if out.len() > MAX_DIR_ENTRIES {
            return Err(Error::generic(format!(
                "vvfat: directory '{}' has more than the {MAX_DIR_ENTRIES} entries a FAT directory can hold",
                dir.display()
            )));
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}
