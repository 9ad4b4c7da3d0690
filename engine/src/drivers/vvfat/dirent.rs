//! FAT directory entries: 8.3 short names (with `~N` tails), VFAT long
//! name entries and their checksum, and the packed date and time fields.

use crate::error::{Error, Result};
use std::collections::HashSet;

/// Bytes of one directory entry.
pub(super) const ENTRY: usize = 32;

pub(super) const ATTR_VOLUME: u8 = 0x08;
pub(super) const ATTR_DIR: u8 = 0x10;
pub(super) const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_LFN: u8 = 0x0f;

/// UTF-16 units a long name may hold.
const MAX_LONG: usize = 255;
/// UTF-16 units per long name entry.
const PER_LFN: usize = 13;
/// Where the 13 units sit in a long name entry.
const LFN_SLOTS: [usize; PER_LFN] = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];

/// A name as a directory stores it: the short entry's 11 bytes, and the
/// UTF-16 long name when the short one cannot say the name exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DirName {
    pub short: [u8; 11],
    pub long: Option<Vec<u16>>,
}

impl DirName {
    /// Directory entries the name takes (long name entries + the short one).
    pub fn slots(&self) -> usize {
        self.long.as_ref().map_or(0, |l| l.len().div_ceil(PER_LFN)) + 1
    }
}

/// Characters a short name may hold besides letters and digits.
const SHORT_EXTRA: &[u8] = b"$%'-_@~`!(){}^#&";

fn short_char(c: char) -> Option<u8> {
    let c = c.to_ascii_uppercase();
    (c.is_ascii_uppercase()
        || c.is_ascii_digit()
        || (c.is_ascii() && SHORT_EXTRA.contains(&(c as u8))))
    .then_some(c as u8)
}

/// The name `name` gets in a directory whose short names so far are
/// `taken` (which it joins): the basis name of up to 8 + 3 valid
/// characters, with a `~N` tail when characters were lost or the basis is
/// already taken; a long name whenever the short one differs from `name`.
pub(super) fn dir_name(name: &str, taken: &mut HashSet<[u8; 11]>) -> Result<DirName> {
    let long: Vec<u16> = name.encode_utf16().collect();
    if long.len() > MAX_LONG {
        return Err(Error::generic(format!(
            "the name '{name}' is longer than the {MAX_LONG} characters of a FAT long name"
        )));
    }
    // Leading dots cannot start a short name; the last other dot starts the extension.
    let trimmed = name.trim_start_matches('.');
    let mut lossy = trimmed.len() != name.len();
    let (base, ext) = match trimmed.rfind('.') {
        Some(at) => (&trimmed[..at], &trimmed[at + 1..]),
        None => (trimmed, ""),
    };
    let mut short = [b' '; 11];
    let mut copy = |part: &str, to: &mut [u8]| {
        let mut n = 0;
        for c in part.chars() {
            match short_char(c) {
                Some(b) if n < to.len() => {
                    to[n] = b;
                    n += 1;
                }
                _ => lossy = true,
            }
        }
        n
    };
    let base_len = copy(base, &mut short[..8]);
    copy(ext, &mut short[8..]);
    let mut name11 = short;
    let mut tail = u32::from(lossy);
    loop {
        if tail > 0 {
            let t = format!("~{tail}");
            let at = base_len.min(8 - t.len());
            name11 = short;
            name11[at..at + t.len()].copy_from_slice(t.as_bytes());
        }
        if taken.insert(name11) {
            break;
        }
        tail += 1;
        if tail > 999_999 {
            return Err(Error::generic(format!(
                "no free short name is left for '{name}'"
            )));
        }
    }
    let exact = tail == 0 && short_text(&name11) == name;
    Ok(DirName {
        short: name11,
        long: (!exact).then_some(long),
    })
}

/// A short name as "BASE.EXT".
fn short_text(short: &[u8; 11]) -> String {
    let part = |b: &[u8]| String::from_utf8_lossy(b).trim_end().to_string();
    let (base, ext) = (part(&short[..8]), part(&short[8..]));
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

/// The checksum of a short name that its long name entries carry, so a
/// reader can tell they still belong to it.
pub(super) fn checksum(short: &[u8; 11]) -> u8 {
    short
        .iter()
        .fold(0u8, |sum, &b| sum.rotate_right(1).wrapping_add(b))
}

/// Timestamps of an entry, as FAT packs them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Times {
    pub modified: (u16, u16),
    pub created: (u16, u16),
    pub accessed: u16,
}

/// What a short entry points at.
pub(super) struct Short<'a> {
    pub name: &'a [u8; 11],
    pub attr: u8,
    pub cluster: u32,
    pub size: u32,
    pub times: Times,
}

/// Appends the entries of one name to a directory: its long name entries
/// (last part first, as FAT stores them), then the short entry.
pub(super) fn push_entries(dir: &mut Vec<u8>, long: Option<&[u16]>, short: &Short) {
    if let Some(long) = long {
        let sum = checksum(short.name);
        let parts = long.len().div_ceil(PER_LFN);
        for seq in (1..=parts).rev() {
            let mut e = [0u8; ENTRY];
            e[0] = seq as u8 | if seq == parts { 0x40 } else { 0 };
            e[11] = ATTR_LFN;
            e[13] = sum;
            for (i, &at) in LFN_SLOTS.iter().enumerate() {
                let k = (seq - 1) * PER_LFN + i;
                // A name that does not fill its last entry ends with NUL, then 0xffff padding.
                let unit = match k.cmp(&long.len()) {
                    std::cmp::Ordering::Less => long[k],
                    std::cmp::Ordering::Equal => 0,
                    std::cmp::Ordering::Greater => 0xffff,
                };
                e[at..at + 2].copy_from_slice(&unit.to_le_bytes());
            }
            dir.extend_from_slice(&e);
        }
    }
    let mut e = [0u8; ENTRY];
    e[..11].copy_from_slice(short.name);
    e[11] = short.attr;
    let t = short.times;
    e[14..16].copy_from_slice(&t.created.1.to_le_bytes());
    e[16..18].copy_from_slice(&t.created.0.to_le_bytes());
    e[18..20].copy_from_slice(&t.accessed.to_le_bytes());
    e[20..22].copy_from_slice(&((short.cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&t.modified.1.to_le_bytes());
    e[24..26].copy_from_slice(&t.modified.0.to_le_bytes());
    e[26..28].copy_from_slice(&(short.cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&short.size.to_le_bytes());
    dir.extend_from_slice(&e);
}

/// (date, time) of a Unix time in local time, as FAT stores them (FAT
/// dates are local, as QEMU and DOS write them); clamped to FAT's years
/// 1980 to 2107.
pub(super) fn fat_date_time(secs: i64) -> (u16, u16) {
    let t = secs as libc::time_t;
    // SAFETY: zeroed `tm` is a valid value of the plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r only writes `tm`, both pointers are valid.
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return (FIRST_DATE, 0);
    }
    pack(
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
    )
}

/// 1980-01-01.
const FIRST_DATE: u16 = (1 << 5) | 1;

fn pack(year: i32, month: i32, day: i32, hour: i32, min: i32, sec: i32) -> (u16, u16) {
    if year < 1980 {
        return (FIRST_DATE, 0);
    }
    if year > 2107 {
        return ((127 << 9) | (12 << 5) | 31, (23 << 11) | (59 << 5) | 29);
    }
    let date = ((year - 1980) << 9) | (month << 5) | day;
    let time = (hour << 11) | (min << 5) | (sec / 2);
    (date as u16, time as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(n: &str, taken: &mut HashSet<[u8; 11]>) -> (String, bool) {
        let d = dir_name(n, taken).unwrap();
        (
            String::from_utf8(d.short.to_vec()).unwrap(),
            d.long.is_some(),
        )
    }

    #[test]
    fn exact_short_names_need_no_long_name() {
        let mut t = HashSet::new();
        assert_eq!(name("README.TXT", &mut t), ("README  TXT".into(), false));
        assert_eq!(name("A", &mut t), ("A          ".into(), false));
        assert_eq!(name("readme.txt", &mut t), ("README~1TXT".into(), true));
    }

    #[test]
    fn lossy_names_get_a_tail_and_collisions_count_up() {
        let mut t = HashSet::new();
        assert_eq!(
            name("Long File Name.txt", &mut t),
            ("LONGFI~1TXT".into(), true)
        );
        assert_eq!(
            name("longfilename.txt", &mut t),
            ("LONGFI~2TXT".into(), true)
        );
        assert_eq!(
            name("LongFileNameToo.txt", &mut t),
            ("LONGFI~3TXT".into(), true)
        );
        // Lower case alone is exact once upper-cased, so no tail at first.
        assert_eq!(name("short.c", &mut t), ("SHORT   C  ".into(), true));
        assert_eq!(name("SHORT.C", &mut t), ("SHORT~1 C  ".into(), true));
    }

    #[test]
    fn tails_grow_into_the_base() {
        let mut t = HashSet::new();
        for i in 1..=9 {
            name(&format!("collide-{i}-long.dat"), &mut t);
        }
        assert_eq!(
            name("collide-x-long.dat", &mut t),
            ("COLLI~10DAT".into(), true)
        );
        let mut t = HashSet::new();
        assert_eq!(name("ab cd", &mut t), ("ABCD~1     ".into(), true));
    }

    #[test]
    fn dots_and_foreign_characters() {
        let mut t = HashSet::new();
        assert_eq!(name(".bashrc", &mut t), ("BASHRC~1   ".into(), true));
        assert_eq!(name("archive.tar.gz", &mut t), ("ARCHIV~1GZ ".into(), true));
        assert_eq!(name("日本.txt", &mut t), ("~1      TXT".into(), true));
        assert_eq!(name("ünïcödé", &mut t), ("NCD~1      ".into(), true));
        assert_eq!(name("x.jpeg", &mut t), ("X~1     JPE".into(), true));
    }

    #[test]
    fn too_long_names_are_refused() {
        let mut t = HashSet::new();
        assert!(dir_name(&"é".repeat(256), &mut t).is_err());
        assert!(dir_name(&"é".repeat(255), &mut t).is_ok());
    }

    #[test]
    fn checksum_is_the_fat_rotate_and_add() {
        // The specification's form: shift right, carry the low bit to the top, add.
        let mut s: u8 = 0;
        for &b in b"README~1TXT" {
            s = (if s & 1 != 0 { 0x80 } else { 0 }) + (s >> 1);
            s = s.wrapping_add(b);
        }
        assert_eq!(checksum(b"README~1TXT"), s);
        assert_eq!(checksum(b"README~1TXT"), 0x6b);
    }

    #[test]
    fn long_name_entries_are_laid_out_last_first() {
        let mut dir = Vec::new();
        let long: Vec<u16> = "A name of 14 c".encode_utf16().collect();
        assert_eq!(long.len(), 14);
        let short = *b"ANAMEO~1   ";
        push_entries(
            &mut dir,
            Some(&long),
            &Short {
                name: &short,
                attr: ATTR_ARCHIVE,
                cluster: 0x12345,
                size: 77,
                times: Times::default(),
            },
        );
        assert_eq!(dir.len(), 3 * ENTRY);
        assert_eq!(dir[0], 0x42);
        assert_eq!(dir[ENTRY], 0x01);
        assert_eq!(dir[11], ATTR_LFN);
        assert_eq!(dir[13], checksum(&short));
        // Entry 2 holds unit 13 ('c'), then NUL, then 0xffff padding.
        assert_eq!(&dir[1..7], &[b'c', 0, 0, 0, 0xff, 0xff]);
        // Entry 1 holds "A name of 14 " across its three slot runs.
        assert_eq!(dir[ENTRY + 1], b'A');
        assert_eq!(dir[ENTRY + 14], b'e');
        assert_eq!(dir[ENTRY + 18], b'o');
        assert_eq!(dir[ENTRY + 28], b'4');
        assert_eq!(dir[ENTRY + 30], b' ');
        let s = &dir[2 * ENTRY..];
        assert_eq!(&s[..11], &short);
        assert_eq!(u16::from_le_bytes([s[20], s[21]]), 1);
        assert_eq!(u16::from_le_bytes([s[26], s[27]]), 0x2345);
        assert_eq!(u32::from_le_bytes([s[28], s[29], s[30], s[31]]), 77);
    }

    #[test]
    fn dates_pack_and_clamp() {
        assert_eq!(pack(1970, 1, 1, 0, 0, 0), (FIRST_DATE, 0));
        assert_eq!(
            pack(2021, 3, 4, 5, 6, 8),
            ((41 << 9) | (3 << 5) | 4, (5 << 11) | (6 << 5) | 4)
        );
        assert_eq!(pack(2200, 1, 1, 0, 0, 0).0 >> 9, 127);
    }
}
