//! Legacy qcow/qcow2 AES encryption (qcow v1 and qcow2 `crypt_method` 1).
//!
//! The key is the password's bytes, truncated or zero-padded to 16. Each
//! 512-byte sector is AES-128-CBC encrypted on its own with the IV "plain64"
//! of its sector number: the GUEST offset / 512 as a little-endian u64,
//! followed by eight zero bytes. The cipher comes from the RustCrypto crates
//! (audited, constant-time), only the sector framing is ours.

use super::{Done, Encryption};
use crate::drivers::qcow2::meta::{read_at, write_at};
use crate::error::{Error, ErrorKind, Result};
use crate::graph::Node;
use crate::io::Buf;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecryptMut, BlockEncryptMut, InnerIvInit, KeyInit};
use aes::Aes128;
use parking_lot::RwLock;
use std::sync::Arc;

pub const SECTOR: u64 = 512;

/// An expanded key.
pub struct Cipher {
    aes: Aes128,
}

impl Cipher {
    pub fn new(password: &str) -> Cipher {
        let mut key = [0u8; 16];
        let pw = password.as_bytes();
        let n = pw.len().min(16);
        key[..n].copy_from_slice(&pw[..n]);
        Cipher {
            aes: Aes128::new(&key.into()),
        }
    }

    fn iv(sector: u64) -> GenericArray<u8, aes::cipher::consts::U16> {
        let mut iv = [0u8; 16];
        iv[..8].copy_from_slice(&sector.to_le_bytes());
        iv.into()
    }

    /// Encrypts `data` (whole sectors) in place; it starts at guest offset
    /// `guest`, a multiple of the sector size.
    pub fn encrypt(&self, guest: u64, data: &mut [u8]) {
        debug_assert!(whole_sectors(guest, data.len()));
        for (i, sector) in data.chunks_exact_mut(SECTOR as usize).enumerate() {
            let iv = Self::iv(guest / SECTOR + i as u64);
            let mut enc = cbc::Encryptor::<Aes128>::inner_iv_init(self.aes.clone(), &iv);
            for block in sector.chunks_exact_mut(16) {
                enc.encrypt_block_mut(GenericArray::from_mut_slice(block));
            }
        }
    }

    /// The inverse of [`Cipher::encrypt`].
    pub fn decrypt(&self, guest: u64, data: &mut [u8]) {
        debug_assert!(whole_sectors(guest, data.len()));
        for (i, sector) in data.chunks_exact_mut(SECTOR as usize).enumerate() {
            let iv = Self::iv(guest / SECTOR + i as u64);
            let mut dec = cbc::Decryptor::<Aes128>::inner_iv_init(self.aes.clone(), &iv);
            for block in sector.chunks_exact_mut(16) {
                dec.decrypt_block_mut(GenericArray::from_mut_slice(block));
            }
        }
    }
}

/// The key state of one image layer.
pub struct Key {
    encrypted: bool,
    cipher: RwLock<Option<Arc<Cipher>>>,
}

impl Key {
    pub fn new(encrypted: bool) -> Key {
        Key {
            encrypted,
            cipher: RwLock::new(None),
        }
    }

    pub fn is_encrypted(&self) -> bool {
        self.encrypted
    }

    pub fn encryption(&self) -> Encryption {
        if !self.encrypted {
            return Encryption::None;
        }
        Encryption::Encrypted {
            key_missing: self.cipher.read().is_none(),
        }
    }

    pub fn set_password(&self, password: &str) -> Result<()> {
        if !self.encrypted {
            return Err(Error::generic("Device is not encrypted"));
        }
        *self.cipher.write() = Some(Arc::new(Cipher::new(password)));
        Ok(())
    }

    /// The cipher for a data request: `None` for a plain image, an error
    /// while the password is missing (nothing may be read or written then).
    pub fn cipher(&self) -> Result<Option<Arc<Cipher>>> {
        if !self.encrypted {
            return Ok(None);
        }
        match &*self.cipher.read() {
            Some(c) => Ok(Some(c.clone())),
            None => Err(Error::new(
                ErrorKind::DeviceEncrypted,
                "the image is encrypted and its key is missing (use block_passwd)",
            )),
        }
    }
}

/// Whether `offset..offset+len` covers whole sectors only.
pub fn whole_sectors(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(SECTOR) && (len as u64).is_multiple_of(SECTOR)
}

/// Writes whole sectors (see [`whole_sectors`]) of guest data at `host`,
/// encrypting a copy: the caller gets its plaintext buffer back.
pub fn write_sectors(
    file: &Arc<Node>,
    cipher: &Cipher,
    guest: u64,
    host: u64,
    buf: Buf,
    done: Done<Buf>,
) {
    let mut scratch = Buf::from_slice(&buf);
    cipher.encrypt(guest, &mut scratch);
    file.write(host, scratch, Box::new(move |r| done(r.map(|_| buf))));
}

/// The sector-aligned range around `offset..offset+len`.
fn sector_span(offset: u64, len: usize) -> (u64, usize) {
    let start = offset / SECTOR * SECTOR;
    let end = (offset + len as u64).next_multiple_of(SECTOR);
    (start, (end - start) as usize)
}

/// Reads encrypted data at `host` holding guest offset `guest` into `buf`
/// and decrypts it in the completion. Data clusters are sector aligned in
/// both spaces, so whole sectors around the request are read.
pub fn read_decrypted(
    file: &Arc<Node>,
    cipher: Arc<Cipher>,
    guest: u64,
    host: u64,
    buf: Buf,
    done: Done<Buf>,
) {
    let (gstart, span) = sector_span(guest, buf.len());
    let head = (guest - gstart) as usize;
    let hstart = host - head as u64;
    if head == 0 && span == buf.len() {
        return file.read(
            hstart,
            buf,
            Box::new(move |r| {
                done(r.map(|mut b| {
                    cipher.decrypt(gstart, &mut b);
                    b
                }))
            }),
        );
    }
    let mut out = buf;
    file.read(
        hstart,
        Buf::recycled(span),
        Box::new(move |r| {
            done(r.map(|mut b| {
                cipher.decrypt(gstart, &mut b);
                let n = out.len();
                out.copy_from_slice(&b[head..head + n]);
                out
            }))
        }),
    );
}

/// Writes `data` (guest offset `guest`) encrypted over existing data at
/// `host`, synchronously; partial sectors are read, decrypted and merged.
pub fn write_encrypted(
    file: &Node,
    cipher: &Cipher,
    guest: u64,
    host: u64,
    data: &[u8],
) -> Result<()> {
    let (gstart, span) = sector_span(guest, data.len());
    let head = (guest - gstart) as usize;
    let hstart = host - head as u64;
    let mut scratch = if head == 0 && span == data.len() {
        Buf::from_slice(data)
    } else {
        let mut b = read_at(file, hstart, span)?;
        cipher.decrypt(gstart, &mut b);
        b[head..head + data.len()].copy_from_slice(data);
        b
    };
    cipher.encrypt(gstart, &mut scratch);
    write_at(file, hstart, &scratch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// qemu-io on an image made with `qemu-img create -f qcow2 -o
    /// encrypt.format=aes` (password "PASSWORD"), after `write -P 0x5a 0 64k`:
    /// the first 32 bytes of sectors 0, 1 and 127 of the data cluster.
    const FIXTURE: [(u64, &str); 3] = [
        (
            0,
            "a35d66d340b28c791cf69ac9f0ebe037511c45741b78eb827c33798fd5a5591a",
        ),
        (
            1,
            "91eec4f802e2b18f364d08ca724df20e32b057fb92bfcea6f7d962cb9c0ae12f",
        ),
        (
            127,
            "d16c6247eefc5e5e717e48a1f3572b9995f0bc8f24a90ca0364f8f08b914c446",
        ),
    ];

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn matches_qemu() {
        let c = Cipher::new("PASSWORD");
        for (sector, want) in FIXTURE {
            let mut data = vec![0x5au8; 512];
            c.encrypt(sector * 512, &mut data);
            assert_eq!(hex(&data[..32]), want, "sector {sector}");
            c.decrypt(sector * 512, &mut data);
            assert!(data.iter().all(|&b| b == 0x5a));
        }
    }

    #[test]
    fn multi_sector_and_key_rules() {
        let c = Cipher::new("PASSWORD");
        // Encrypting sectors 0..128 at once equals sector by sector.
        let mut all = vec![0x5au8; 128 * 512];
        c.encrypt(0, &mut all);
        for (sector, want) in FIXTURE {
            let at = sector as usize * 512;
            assert_eq!(hex(&all[at..at + 32]), want);
        }
        // Only the first 16 bytes of the password count; shorter ones are zero-padded.
        let (mut a, mut b) = ([7u8; 512], [7u8; 512]);
        Cipher::new("0123456789abcdefXYZ").encrypt(512, &mut a);
        Cipher::new("0123456789abcdef").encrypt(512, &mut b);
        assert_eq!(a, b);
        let mut d = [7u8; 512];
        Cipher::new("PASSWORD\0").encrypt(512, &mut d);
        let mut e = [7u8; 512];
        c.encrypt(512, &mut e);
        assert_eq!(d, e);
        let mut w = [7u8; 512];
        Cipher::new("password").encrypt(512, &mut w);
        assert_ne!(w, e);
    }

    #[test]
    fn key_state() {
        let k = Key::new(true);
        assert_eq!(k.encryption(), Encryption::Encrypted { key_missing: true });
        let e = k.cipher().err().map(|e| e.kind);
        assert_eq!(e, Some(ErrorKind::DeviceEncrypted));
        k.set_password("x").unwrap();
        assert_eq!(k.encryption(), Encryption::Encrypted { key_missing: false });
        assert!(k.cipher().unwrap().is_some());
        let plain = Key::new(false);
        assert_eq!(plain.encryption(), Encryption::None);
        assert!(plain.cipher().unwrap().is_none());
        assert!(plain.set_password("x").is_err());
    }
}
