//! The FUSE wire format for the requests that arrive on an io_uring queue
//! entry: a decoder for the operations blkfs serves and encoders for their
//! replies. Pure byte work (std only) so it can be unit-tested and fuzzed.
//!
//! On a ring entry the kernel splits a request in three: `fuse_in_header`
//! at the start of the header buffer, the opcode's fixed struct in the
//! `op_in` area, and every further argument (names, write data) in the
//! payload buffer. Replies go to the payload; the out header is written by
//! the transport.

/// Size of `struct fuse_uring_req_header`.
pub const RING_HEADER_LEN: usize = 288;
const OP_IN: usize = 128;
/// `fuse_uring_ent_in_out`: commit id and payload size.
pub const COMMIT_ID_AT: usize = 264;
pub const PAYLOAD_SZ_AT: usize = 272;
const OUT_HEADER_LEN: usize = 16;

pub mod opcode {
    pub const LOOKUP: u32 = 1;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const FLUSH: u32 = 25;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const FALLOCATE: u32 = 43;
    pub const LSEEK: u32 = 46;
}

/// `fuse_setattr_in.valid` bits blkfs looks at.
pub const FATTR_MODE: u32 = 1 << 0;
pub const FATTR_UID: u32 = 1 << 1;
pub const FATTR_GID: u32 = 1 << 2;
pub const FATTR_SIZE: u32 = 1 << 3;

pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;
pub const FOPEN_PASSTHROUGH: u32 = 1 << 7;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Op<'a> {
    Lookup {
        name: &'a [u8],
    },
    Getattr,
    Setattr {
        valid: u32,
        size: u64,
        mode: u32,
        uid: u32,
        gid: u32,
    },
    Open {
        flags: u32,
    },
    Read {
        offset: u64,
        size: u32,
    },
    Write {
        offset: u64,
        data: &'a [u8],
    },
    Statfs,
    Release,
    Fsync,
    Getxattr {
        size: u32,
    },
    Listxattr {
        size: u32,
    },
    Flush,
    Opendir,
    Readdir {
        offset: u64,
        size: u32,
    },
    Releasedir,
    Destroy,
    Fallocate {
        offset: u64,
        length: u64,
        mode: u32,
    },
    Lseek {
        offset: u64,
        whence: u32,
    },
    Ioctl {
        cmd: u32,
        out_size: u32,
    },
    /// An operation blkfs does not serve: answered ENOSYS.
    Other(u32),
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The request header of a ring entry; None when the buffer is too short.
pub fn in_header(hdr: &[u8]) -> Option<InHeader> {
    if hdr.len() < RING_HEADER_LEN {
        return None;
    }
    Some(InHeader {
        opcode: u32_at(hdr, 4)?,
        unique: u64_at(hdr, 8)?,
        nodeid: u64_at(hdr, 16)?,
    })
}

pub fn commit_id(hdr: &[u8]) -> Option<u64> {
    u64_at(hdr, COMMIT_ID_AT)
}

pub fn payload_size(hdr: &[u8]) -> Option<u32> {
    u32_at(hdr, PAYLOAD_SZ_AT)
}

/// Decodes the operation of a ring entry. `payload` holds exactly the
/// bytes the kernel said it placed there. Err carries the errno to answer.
pub fn decode<'a>(hdr: &'a [u8], payload: &'a [u8]) -> Result<(InHeader, Op<'a>), i32> {
    let h = in_header(hdr).ok_or(libc::EIO)?;
    let extlen = u16_at(hdr, 36).ok_or(libc::EIO)? as usize * 8;
    let inval = libc::EINVAL;
    let op_in = &hdr[OP_IN..OP_IN + 128];
    let op = match h.opcode {
        opcode::LOOKUP => {
            // The name, NUL-terminated, then any request extensions.
            let args = payload
                .get(..payload.len().saturating_sub(extlen))
                .ok_or(inval)?;
            let end = args.iter().position(|&b| b == 0).ok_or(inval)?;
            Op::Lookup { name: &args[..end] }
        }
        opcode::GETATTR => Op::Getattr,
        opcode::SETATTR => Op::Setattr {
            valid: u32_at(op_in, 0).ok_or(inval)?,
            size: u64_at(op_in, 16).ok_or(inval)?,
            mode: u32_at(op_in, 68).ok_or(inval)?,
            uid: u32_at(op_in, 76).ok_or(inval)?,
            gid: u32_at(op_in, 80).ok_or(inval)?,
        },
        opcode::OPEN => Op::Open {
            flags: u32_at(op_in, 0).ok_or(inval)?,
        },
        opcode::READ => Op::Read {
            offset: u64_at(op_in, 8).ok_or(inval)?,
            size: u32_at(op_in, 16).ok_or(inval)?,
        },
        opcode::WRITE => {
            let size = u32_at(op_in, 16).ok_or(inval)? as usize;
            Op::Write {
                offset: u64_at(op_in, 8).ok_or(inval)?,
                data: payload.get(..size).ok_or(inval)?,
            }
        }
        opcode::STATFS => Op::Statfs,
        opcode::RELEASE => Op::Release,
        opcode::FSYNC => Op::Fsync,
        opcode::GETXATTR => Op::Getxattr {
            size: u32_at(op_in, 0).ok_or(inval)?,
        },
        opcode::LISTXATTR => Op::Listxattr {
            size: u32_at(op_in, 0).ok_or(inval)?,
        },
        opcode::FLUSH => Op::Flush,
        opcode::OPENDIR => Op::Opendir,
        opcode::READDIR => Op::Readdir {
            offset: u64_at(op_in, 8).ok_or(inval)?,
            size: u32_at(op_in, 16).ok_or(inval)?,
        },
        opcode::RELEASEDIR => Op::Releasedir,
        opcode::DESTROY => Op::Destroy,
        opcode::FALLOCATE => Op::Fallocate {
            offset: u64_at(op_in, 8).ok_or(inval)?,
            length: u64_at(op_in, 16).ok_or(inval)?,
            mode: u32_at(op_in, 24).ok_or(inval)?,
        },
        opcode::LSEEK => Op::Lseek {
            offset: u64_at(op_in, 8).ok_or(inval)?,
            whence: u32_at(op_in, 16).ok_or(inval)?,
        },
        opcode::IOCTL => Op::Ioctl {
            cmd: u32_at(op_in, 12).ok_or(inval)?,
            out_size: u32_at(op_in, 28).ok_or(inval)?,
        },
        other => Op::Other(other),
    };
    Ok((h, op))
}

/// Writes the out header and the reply's payload size into a ring header.
/// `result` is the reply length or a positive errno.
pub fn put_reply(hdr: &mut [u8], unique: u64, result: Result<usize, i32>) {
    let (len, error) = match result {
        Ok(n) => (n, 0),
        Err(e) => (0, -e.abs()),
    };
    hdr[..OUT_HEADER_LEN].fill(0);
    hdr[0..4].copy_from_slice(&((OUT_HEADER_LEN + len) as u32).to_le_bytes());
    hdr[4..8].copy_from_slice(&error.to_le_bytes());
    hdr[8..16].copy_from_slice(&unique.to_le_bytes());
    hdr[PAYLOAD_SZ_AT..PAYLOAD_SZ_AT + 4].copy_from_slice(&(len as u32).to_le_bytes());
}

/// What the kernel needs of a file's attributes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub blocks: u64,
    pub time: (u64, u32),
    /// File type bits and permissions, as in st_mode.
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub blksize: u32,
}

/// A little-endian writer over a reply buffer; every put is bounds-checked
/// by the slice, and callers size replies far below the payload buffer.
struct Out<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Out<'_> {
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }
    fn attr(&mut self, a: &Attr) -> &mut Self {
        let (s, ns) = a.time;
        self.u64(a.ino).u64(a.size).u64(a.blocks);
        self.u64(s).u64(s).u64(s).u32(ns).u32(ns).u32(ns);
        self.u32(a.mode).u32(a.nlink).u32(a.uid).u32(a.gid);
        self.u32(0).u32(a.blksize).u32(0)
    }
}

/// `fuse_entry_out` with zero validity (nothing is cached). 128 bytes.
pub fn entry_out(out: &mut [u8], a: &Attr) -> usize {
    let mut w = Out { buf: out, at: 0 };
    w.u64(a.ino).u64(0).u64(0).u64(0).u32(0).u32(0).attr(a);
    w.at
}

/// `fuse_attr_out` with zero validity. 104 bytes.
pub fn attr_out(out: &mut [u8], a: &Attr) -> usize {
    let mut w = Out { buf: out, at: 0 };
    w.u64(0).u32(0).u32(0).attr(a);
    w.at
}

/// `fuse_open_out`. 16 bytes.
pub fn open_out(out: &mut [u8], open_flags: u32, backing_id: u32) -> usize {
    let mut w = Out { buf: out, at: 0 };
    w.u64(0).u32(open_flags).u32(backing_id);
    w.at
}

/// `fuse_write_out`. 8 bytes.
pub fn write_out(out: &mut [u8], size: u32) -> usize {
    let mut w = Out { buf: out, at: 0 };
    w.u32(size).u32(0);
    w.at
}

/// `fuse_getxattr_out` (the size a list or value would need). 8 bytes.
pub fn xattr_size_out(out: &mut [u8], size: u32) -> usize {
    write_out(out, size)
}

/// `fuse_lseek_out`. 8 bytes.
pub fn lseek_out(out: &mut [u8], offset: u64) -> usize {
    let mut w = Out { buf: out, at: 0 };
    w.u64(offset);
    w.at
}

/// `fuse_ioctl_out` (result 0, no retry) followed by `data`.
pub fn ioctl_out(out: &mut [u8], data: &[u8]) -> usize {
    let mut w = Out { buf: out, at: 0 };
    w.u32(0).u32(0).u32(0).u32(0).bytes(data);
    w.at
}

/// `fuse_statfs_out` as fuser's default answers it (no blocks, 512-byte
/// blocks, 255-byte names). 80 bytes.
pub fn statfs_out(out: &mut [u8]) -> usize {
    let mut w = Out { buf: out, at: 0 };
    w.u64(0).u64(0).u64(0).u64(0).u64(0);
    w.u32(512).u32(255).u32(0).u32(0);
    for _ in 0..6 {
        w.u32(0);
    }
    w.at
}

pub const DT_DIR: u32 = 4;
pub const DT_REG: u32 = 8;

/// Appends one `fuse_dirent` at `at` if it fits in `out`; returns the new
/// end, or None when the buffer is full.
pub fn dirent(
    out: &mut [u8],
    at: usize,
    ino: u64,
    off: u64,
    kind: u32,
    name: &[u8],
) -> Option<usize> {
    let len = (24 + name.len()).next_multiple_of(8);
    if at + len > out.len() {
        return None;
    }
    let mut w = Out { buf: out, at };
    w.u64(ino)
        .u64(off)
        .u32(name.len() as u32)
        .u32(kind)
        .bytes(name);
    let (written, end) = (w.at, at + len);
    out[written..end].fill(0);
    Some(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IN_HEADER_LEN: usize = 40;

    fn header(opcode: u32, unique: u64, nodeid: u64, op_in: &[u8], payload_sz: u32) -> Vec<u8> {
        let mut h = vec![0u8; RING_HEADER_LEN];
        let len = IN_HEADER_LEN + op_in.len() + payload_sz as usize;
        h[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        h[4..8].copy_from_slice(&opcode.to_le_bytes());
        h[8..16].copy_from_slice(&unique.to_le_bytes());
        h[16..24].copy_from_slice(&nodeid.to_le_bytes());
        h[OP_IN..OP_IN + op_in.len()].copy_from_slice(op_in);
        h[COMMIT_ID_AT..COMMIT_ID_AT + 8].copy_from_slice(&unique.to_le_bytes());
        h[PAYLOAD_SZ_AT..PAYLOAD_SZ_AT + 4].copy_from_slice(&payload_sz.to_le_bytes());
        h
    }

    fn rw_in(offset: u64, size: u32) -> Vec<u8> {
        let mut v = vec![0u8; 40];
        v[8..16].copy_from_slice(&offset.to_le_bytes());
        v[16..20].copy_from_slice(&size.to_le_bytes());
        v
    }

    #[test]
    fn decodes_read_and_write() {
        let h = header(opcode::READ, 7, 2, &rw_in(4096, 512), 0);
        let (ih, op) = decode(&h, &[]).unwrap();
        assert_eq!(
            ih,
            InHeader {
                opcode: 15,
                unique: 7,
                nodeid: 2
            }
        );
        assert_eq!(
            op,
            Op::Read {
                offset: 4096,
                size: 512
            }
        );
        assert_eq!(commit_id(&h), Some(7));

        let data = [9u8; 16];
        let h = header(opcode::WRITE, 8, 2, &rw_in(1 << 40, 16), 16);
        let (_, op) = decode(&h, &data).unwrap();
        assert_eq!(
            op,
            Op::Write {
                offset: 1 << 40,
                data: &data
            }
        );
        // A write that claims more data than the payload holds is refused.
        let h = header(opcode::WRITE, 8, 2, &rw_in(0, 17), 16);
        assert_eq!(decode(&h, &data), Err(libc::EINVAL));
    }

    #[test]
    fn decodes_lookup_names_without_extensions() {
        let h = header(opcode::LOOKUP, 1, 1, &[], 4);
        assert_eq!(decode(&h, b"d0\0\0").unwrap().1, Op::Lookup { name: b"d0" });
        let h = header(opcode::LOOKUP, 1, 1, &[], 3);
        assert_eq!(decode(&h, b"abc"), Err(libc::EINVAL), "no terminating NUL");
        // Extensions (total_extlen in 8-byte units) follow the name.
        let mut h = header(opcode::LOOKUP, 1, 1, &[], 11);
        h[36..38].copy_from_slice(&1u16.to_le_bytes());
        let (_, op) = decode(&h, b"x\0\0XXXXXXXX").unwrap();
        assert_eq!(op, Op::Lookup { name: b"x" });
    }

    #[test]
    fn unknown_operations_and_short_headers() {
        let h = header(99, 1, 1, &[], 0);
        assert_eq!(decode(&h, &[]).unwrap().1, Op::Other(99));
        assert_eq!(decode(&h[..100], &[]), Err(libc::EIO));
    }

    #[test]
    fn replies_have_the_kernel_sizes() {
        let mut out = [0u8; 256];
        let a = Attr {
            ino: 2,
            size: 1 << 30,
            mode: 0o100600,
            nlink: 1,
            blksize: 4096,
            ..Attr::default()
        };
        assert_eq!(entry_out(&mut out, &a), 128);
        assert_eq!(u64::from_le_bytes(out[0..8].try_into().unwrap()), 2);
        assert_eq!(u64::from_le_bytes(out[48..56].try_into().unwrap()), 1 << 30);
        assert_eq!(attr_out(&mut out, &a), 104);
        assert_eq!(
            u32::from_le_bytes(out[76..80].try_into().unwrap()),
            0o100600
        );
        assert_eq!(open_out(&mut out, FOPEN_PASSTHROUGH, 3), 16);
        assert_eq!(write_out(&mut out, 4096), 8);
        assert_eq!(lseek_out(&mut out, 5), 8);
        assert_eq!(statfs_out(&mut out), 80);

        let mut hdr = vec![0xffu8; RING_HEADER_LEN];
        put_reply(&mut hdr, 42, Err(libc::ENOENT));
        assert_eq!(
            i32::from_le_bytes(hdr[4..8].try_into().unwrap()),
            -libc::ENOENT
        );
        assert_eq!(u64::from_le_bytes(hdr[8..16].try_into().unwrap()), 42);
        assert_eq!(payload_size(&hdr), Some(0));
        put_reply(&mut hdr, 42, Ok(104));
        assert_eq!(u32::from_le_bytes(hdr[0..4].try_into().unwrap()), 120);
        assert_eq!(payload_size(&hdr), Some(104));
    }

    #[test]
    fn dirents_are_padded_and_stop_when_full() {
        let mut out = [0xaau8; 64];
        let end = dirent(&mut out, 0, 1, 1, DT_DIR, b".").unwrap();
        assert_eq!(end, 32);
        assert_eq!(&out[24..32], b".\0\0\0\0\0\0\0");
        let end = dirent(&mut out, end, 2, 2, DT_REG, b"disk0").unwrap();
        assert_eq!(end, 64);
        assert_eq!(dirent(&mut out, end, 3, 3, DT_REG, b"x"), None);
    }
}
