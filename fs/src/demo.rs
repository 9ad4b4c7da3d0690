//! `blkfs --demo`: a sample image in ./blkfs-demo, exported next to it.

use std::io::Write;
use std::path::{Path, PathBuf};

pub struct Demo {
    pub mount: PathBuf,
    pub socket: PathBuf,
    pub blockdev: String,
}

const SIZE: u64 = 64 << 20;

pub fn prepare() -> Result<Demo, String> {
    let dir = std::env::current_dir()
        .map_err(|e| e.to_string())?
        .join("blkfs-demo");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let image = dir.join("sample.img");
    if !image.exists() {
        let mut f = std::fs::File::create(&image)
            .map_err(|e| format!("cannot create {}: {e}", image.display()))?;
        f.write_all(b"Hello from blkfs! This 64 MiB raw image is exported as a plain file.\n")
            .and_then(|()| f.set_len(SIZE))
            .map_err(|e| format!("cannot write {}: {e}", image.display()))?;
    }
    let spec = serde_json::json!({
        "driver": "raw", "id": "sample",
        "file": {"driver": "file", "filename": image.to_string_lossy(), "aio": "native"},
    });
    Ok(Demo {
        mount: dir.join("mnt"),
        socket: dir.join("blkfs.sock"),
        blockdev: spec.to_string(),
    })
}

pub fn print_usage(mount: &Path, socket: &Path) {
    let (m, s) = (mount.display(), socket.display());
    println!(
        "blkfs demo is running. The image blkfs-demo/sample.img is exported as {m}/sample\n\
         Try, in another terminal:\n\
         \x20 head -c 70 {m}/sample\n\
         \x20 dd if=/dev/urandom of={m}/sample bs=1M count=4 seek=8 conv=notrunc oflag=direct\n\
         \x20 qemu-img info -f raw {m}/sample\n\
         \x20 cargo run --release -p blkctl -- --socket {s} block\n\
         \x20 cargo run --release -p blkctl -- --socket {s} stats\n\
         Stop with Ctrl-C (or: blkctl --socket {s} quit)."
    );
}
