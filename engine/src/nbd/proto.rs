//! NBD wire format (the NBD project's doc/proto.md): constants, and the
//! decoding and encoding of messages as pure functions over byte buffers,
//! so they can be tested and fuzzed without a socket. All integers are
//! big-endian.

/// "NBDMAGIC": first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation; also the magic of every option.
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server, 16 bits) and client flags (32 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const FLAG_SEND_CACHE: u16 = 1 << 10;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

// NBD_REP_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation status bits.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// NBD errnos (fixed by the protocol, not the host's values).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest READ/WRITE/CACHE payload and largest option (QEMU's
/// NBD_MAX_BUFFER_SIZE); also the maximum block size advertised.
pub const MAX_BUFFER: u32 = 32 << 20;
/// Longest export name or metadata context query (NBD_MAX_STRING_SIZE).
pub const MAX_STRING: usize = 4096;
/// The one metadata context served, and its id.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 0;
pub const REQUEST_SIZE: usize = 28;
/// Bytes after size and flags in the NBD_OPT_EXPORT_NAME reply, unless
/// the client set NBD_FLAG_C_NO_ZEROES.
pub const EXPORT_NAME_PAD: usize = 124;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Maps a host errno (as the engine reports it) to the NBD errno, as QEMU
/// does: unknown errors become EINVAL.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::EIO => EIO,
        libc::ENOMEM => ENOMEM,
        libc::EDQUOT | libc::EFBIG | libc::ENOSPC => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EINVAL,
    }
}

/// The name of an option, for error messages (as QEMU's nbd_opt_lookup).
pub fn opt_name(opt: u32) -> &'static str {
    match opt {
        OPT_EXPORT_NAME => "export name",
        OPT_ABORT => "abort",
        OPT_LIST => "list",
        4 => "peek export",
        OPT_STARTTLS => "starttls",
        OPT_INFO => "info",
        OPT_GO => "go",
        OPT_STRUCTURED_REPLY => "structured reply",
        OPT_LIST_META_CONTEXT => "list meta context",
        OPT_SET_META_CONTEXT => "set meta context",
        11 => "extended headers",
        _ => "<unknown>",
    }
}

/// The server's first 18 bytes of newstyle negotiation.
pub fn greeting() -> [u8; 18] {
    let mut b = [0u8; 18];
    b[..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&OPTS_MAGIC.to_be_bytes());
    b[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// What the client's 32-bit flags ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

pub fn parse_client_flags(b: [u8; 4]) -> Result<ClientFlags, String> {
    let f = u32::from_be_bytes(b);
    let unknown = f & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    if unknown != 0 {
        return Err(format!("Unknown client flags 0x{unknown:x} received"));
    }
    Ok(ClientFlags {
        fixed_newstyle: f & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: f & FLAG_C_NO_ZEROES != 0,
    })
}

/// An option's header: `IHAVEOPT`, option, payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub opt: u32,
    pub len: u32,
}

pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, String> {
    if be64(b) != OPTS_MAGIC {
        return Err("Bad magic received".into());
    }
    let h = OptionHeader {
        opt: be32(&b[8..]),
        len: be32(&b[12..]),
    };
    if h.len > MAX_BUFFER {
        return Err(format!(
            "len ({}) is larger than max len ({MAX_BUFFER})",
            h.len
        ));
    }
    Ok(h)
}

/// An option reply: header and payload.
pub fn option_reply(opt: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + payload.len());
    v.extend_from_slice(&REP_MAGIC.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// An NBD_REP_INFO reply of type `info`.
pub fn info_reply(opt: u32, info: u16, body: &[u8]) -> Vec<u8> {
    let mut p = info.to_be_bytes().to_vec();
    p.extend_from_slice(body);
    option_reply(opt, REP_INFO, &p)
}

/// NBD_INFO_EXPORT's body, also the start of the NBD_OPT_EXPORT_NAME reply.
pub fn export_info(size: u64, flags: u16) -> [u8; 10] {
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&size.to_be_bytes());
    b[8..].copy_from_slice(&flags.to_be_bytes());
    b
}

/// NBD_INFO_BLOCK_SIZE's body: minimum, preferred, maximum.
pub fn block_size_info(min: u32, preferred: u32, max: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&min.to_be_bytes());
    b[4..8].copy_from_slice(&preferred.to_be_bytes());
    b[8..].copy_from_slice(&max.to_be_bytes());
    b
}

/// NBD_REP_SERVER's body for NBD_OPT_LIST.
pub fn server_entry(name: &str, description: &str) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(description.as_bytes());
    v
}

/// NBD_REP_META_CONTEXT's body.
pub fn meta_context_entry(id: u32, name: &str) -> Vec<u8> {
    let mut v = id.to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// Why an option payload is refused; the message goes back to the client
/// with NBD_REP_ERR_INVALID.
pub type Invalid = String;

/// Reads the fields of one option payload in order.
struct Fields<'a> {
    opt: u32,
    rest: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Invalid> {
        if n > self.rest.len() {
            return Err(format!(
                "Inconsistent lengths in option {}",
                opt_name(self.opt)
            ));
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, Invalid> {
        self.take(2).map(be16)
    }

    fn u32(&mut self) -> Result<u32, Invalid> {
        self.take(4).map(be32)
    }

    /// A UTF-8 string without NUL of `len` bytes.
    fn string(&mut self, len: usize) -> Result<String, Invalid> {
        let b = self.take(len)?;
        if b.contains(&0) {
            return Err(format!(
                "Unexpected embedded NUL in option {}",
                opt_name(self.opt)
            ));
        }
        String::from_utf8(b.to_vec())
            .map_err(|_| format!("Invalid UTF-8 in option {}", opt_name(self.opt)))
    }

    /// A length-prefixed name of at most MAX_STRING bytes.
    fn name(&mut self) -> Result<String, Invalid> {
        let len = self.u32()? as usize;
        if len > MAX_STRING {
            return Err(format!("Invalid name length: {len}"));
        }
        self.string(len)
    }

    fn finish(self) -> Result<(), Invalid> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "option '{}' has unexpected length",
                opt_name(self.opt)
            ))
        }
    }
}

/// NBD_OPT_INFO / NBD_OPT_GO: an export name and the information asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub want_name: bool,
    pub want_block_size: bool,
}

pub fn parse_info(opt: u32, payload: &[u8]) -> Result<InfoRequest, Invalid> {
    let mut f = Fields { opt, rest: payload };
    let name = f.name()?;
    let n = f.u16()?;
    let (mut want_name, mut want_block_size) = (false, false);
    for _ in 0..n {
        match f.u16()? {
            INFO_NAME => want_name = true,
            INFO_BLOCK_SIZE => want_block_size = true,
            // Export (and description) are sent anyway; others are unknown.
            _ => {}
        }
    }
    f.finish()?;
    Ok(InfoRequest {
        name,
        want_name,
        want_block_size,
    })
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    pub export: String,
    /// Over-long queries are left out (QEMU skips them).
    pub queries: Vec<String>,
}

pub fn parse_meta(opt: u32, payload: &[u8]) -> Result<MetaRequest, Invalid> {
    let mut f = Fields { opt, rest: payload };
    let export = f.name()?;
    let n = f.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        let len = f.u32()? as usize;
        if len > MAX_STRING {
            f.take(len)?;
            continue;
        }
        queries.push(f.string(len)?);
    }
    f.finish()?;
    Ok(MetaRequest { export, queries })
}

/// Whether `base:allocation` answers a metadata query: by name, or, when
/// listing, by an empty query or the bare `base:` namespace.
pub fn selects_base_allocation(list: bool, queries: &[String]) -> bool {
    if list && queries.is_empty() {
        return true;
    }
    queries
        .iter()
        .any(|q| q == BASE_ALLOCATION || (list && q == "base:"))
}

/// One transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

pub fn parse_request(b: &[u8; REQUEST_SIZE]) -> Result<Request, String> {
    let magic = be32(b);
    if magic != REQUEST_MAGIC {
        return Err(format!("invalid magic (got 0x{magic:x})"));
    }
    Ok(Request {
        flags: be16(&b[4..]),
        kind: be16(&b[6..]),
        cookie: be64(&b[8..]),
        offset: be64(&b[16..]),
        len: be32(&b[24..]),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_SIZE] {
    let mut b = [0u8; REQUEST_SIZE];
    b[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.kind.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// What a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub block_status: bool,
}

/// A request refused before it reaches the device: the NBD errno and the
/// message of an error chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub errno: u32,
    pub msg: String,
}

fn refuse(errno: u32, msg: impl Into<String>) -> Refusal {
    Refusal {
        errno,
        msg: msg.into(),
    }
}

/// Whether a WRITE's payload is too big to read: the connection cannot
/// stay in step, so it is answered with EINVAL and closed, as QEMU does.
pub fn payload_too_big(r: &Request) -> bool {
    r.kind == CMD_WRITE && r.len > MAX_BUFFER
}

/// The checks QEMU makes before running a request, in its order: length,
/// read-only, range, flags.
pub fn check_request(r: &Request, l: &Limits) -> Result<(), Refusal> {
    let mut valid_flags = CMD_FLAG_FUA;
    let (mut check_len, mut writes) = (false, false);
    match r.kind {
        CMD_READ => {
            check_len = true;
            if l.structured {
                valid_flags |= CMD_FLAG_DF;
            }
        }
        CMD_WRITE => (check_len, writes) = (true, true),
        CMD_CACHE => check_len = true,
        CMD_TRIM => writes = true,
        CMD_WRITE_ZEROES => {
            writes = true;
            valid_flags |= CMD_FLAG_NO_HOLE;
        }
        CMD_BLOCK_STATUS => valid_flags |= CMD_FLAG_REQ_ONE,
        CMD_FLUSH | CMD_DISC => {}
        k => {
            return Err(refuse(
                EINVAL,
                format!("invalid request type ({k}) received"),
            ))
        }
    }
    if check_len && r.len > MAX_BUFFER {
        return Err(refuse(
            EINVAL,
            format!("len ({}) is larger than max len ({MAX_BUFFER})", r.len),
        ));
    }
    if writes && l.read_only {
        return Err(refuse(EPERM, "Export is read-only"));
    }
    if r.offset > l.size || u64::from(r.len) > l.size - r.offset {
        let errno = if matches!(r.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return Err(refuse(
            errno,
            format!(
                "operation past EOF; From: {}, Len: {}, Size: {}",
                r.offset, r.len, l.size
            ),
        ));
    }
    if r.flags & !valid_flags != 0 {
        return Err(refuse(
            EINVAL,
            format!("unsupported flags (got 0x{:x})", r.flags),
        ));
    }
    if r.kind == CMD_BLOCK_STATUS {
        if r.len == 0 {
            return Err(refuse(EINVAL, "need non-zero length"));
        }
        if !l.block_status {
            return Err(refuse(EINVAL, "CMD_BLOCK_STATUS not negotiated"));
        }
    }
    Ok(())
}

pub fn simple_reply(cookie: u64, errno: u32) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&errno.to_be_bytes());
    b[8..].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk's header, for a payload of `len` bytes.
pub fn chunk_header(flags: u16, kind: u16, cookie: u64, len: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..].copy_from_slice(&len.to_be_bytes());
    b
}

/// The head of a final OFFSET_DATA chunk; `len` data bytes follow it.
pub fn data_chunk_head(cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut v = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        len.saturating_add(8),
    )
    .to_vec();
    v.extend_from_slice(&offset.to_be_bytes());
    v
}

/// A final ERROR chunk.
pub fn error_chunk(cookie: u64, errno: u32, msg: &str) -> Vec<u8> {
    // The message is at most 4096 bytes, as every string of the protocol.
    let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
    let mut v = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + msg.len() as u32,
    )
    .to_vec();
    v.extend_from_slice(&errno.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// A final BLOCK_STATUS chunk of (length, flags) extents.
pub fn block_status_chunk(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len() as u32;
    let mut v = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len).to_vec();
    v.extend_from_slice(&context.to_be_bytes());
    for (l, f) in extents {
        v.extend_from_slice(&l.to_be_bytes());
        v.extend_from_slice(&f.to_be_bytes());
    }
    v
}

/// The reply to a request without data: a simple reply, or a final NONE
/// or ERROR chunk once structured replies are on.
pub fn status_reply(structured: bool, cookie: u64, err: Option<(u32, &str)>) -> Vec<u8> {
    match (structured, err) {
        (true, Some((errno, msg))) => error_chunk(cookie, errno, msg),
        (true, None) => chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0).to_vec(),
        (false, e) => simple_reply(cookie, e.map_or(0, |(n, _)| n)).to_vec(),
    }
}

/// Adds an extent to a list, merging it with the last one when they share
/// flags; false once `max` extents are full (the extent is left out).
pub fn push_extent(out: &mut Vec<(u32, u32)>, max: usize, len: u32, flags: u32) -> bool {
    if let Some(last) = out.last_mut() {
        if last.1 == flags {
            if let Some(sum) = last.0.checked_add(len) {
                last.0 = sum;
                return true;
            }
        }
    }
    if out.len() >= max {
        return false;
    }
    out.push((len, flags));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            size: 1 << 20,
            read_only: false,
            structured: true,
            block_status: true,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, len: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 7,
            offset,
            len,
        }
    }

    #[test]
    fn greeting_and_client_flags() {
        let g = greeting();
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        let f = parse_client_flags([0, 0, 0, 3]).unwrap();
        assert!(f.fixed_newstyle && f.no_zeroes);
        assert_eq!(
            parse_client_flags([0, 0, 0, 4]).unwrap_err(),
            "Unknown client flags 0x4 received"
        );
    }

    #[test]
    fn option_headers() {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(b"IHAVEOPT");
        b[11] = 7; // NBD_OPT_GO
        b[15] = 9; // length
        assert_eq!(
            parse_option_header(&b).unwrap(),
            OptionHeader { opt: 7, len: 9 }
        );
        b[12..].copy_from_slice(&(MAX_BUFFER + 1).to_be_bytes());
        assert!(parse_option_header(&b).is_err());
        b[0] = b'X';
        assert_eq!(parse_option_header(&b).unwrap_err(), "Bad magic received");
    }

    #[test]
    fn info_payloads() {
        // name length 2, "d0", 2 requests: NAME, BLOCK_SIZE
        let p = [0, 0, 0, 2, b'd', b'0', 0, 2, 0, 1, 0, 3];
        let r = parse_info(OPT_GO, &p).unwrap();
        assert_eq!(r.name, "d0");
        assert!(r.want_name && r.want_block_size);
        assert_eq!(
            parse_info(OPT_GO, &p[..11]).unwrap_err(),
            "Inconsistent lengths in option go"
        );
        let mut long = p.to_vec();
        long.push(0);
        assert_eq!(
            parse_info(OPT_INFO, &long).unwrap_err(),
            "option 'info' has unexpected length"
        );
        let nul = [0, 0, 0, 1, 0, 0, 0];
        assert!(parse_info(OPT_GO, &nul).unwrap_err().contains("NUL"));
        let huge = [0, 0, 0x10, 1];
        assert_eq!(
            parse_info(OPT_GO, &huge).unwrap_err(),
            "Invalid name length: 4097"
        );
    }

    #[test]
    fn meta_payloads() {
        let mut p = vec![0, 0, 0, 1, b'e', 0, 0, 0, 2];
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        let m = parse_meta(OPT_SET_META_CONTEXT, &p).unwrap();
        assert_eq!(m.export, "e");
        assert!(selects_base_allocation(false, &m.queries));
        assert!(!selects_base_allocation(false, &["base:".into()]));
        assert!(selects_base_allocation(true, &["base:".into()]));
        assert!(selects_base_allocation(true, &[]));
        assert!(!selects_base_allocation(false, &[]));
    }

    #[test]
    fn requests_round_trip_and_bad_magic() {
        let r = req(CMD_WRITE, CMD_FLAG_FUA, 4096, 512);
        let b = encode_request(&r);
        assert_eq!(parse_request(&b).unwrap(), r);
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(
            parse_request(&bad).unwrap_err(),
            "invalid magic (got 0x609513)"
        );
    }

    #[test]
    fn request_checks_in_qemus_order() {
        let l = limits();
        assert!(check_request(&req(CMD_READ, 0, 0, 4096), &l).is_ok());
        let big = check_request(&req(CMD_READ, 0, 0, MAX_BUFFER + 1), &l).unwrap_err();
        assert_eq!(big.errno, EINVAL);
        assert!(payload_too_big(&req(CMD_WRITE, 0, 0, MAX_BUFFER + 1)));
        let ro = Limits {
            read_only: true,
            ..l
        };
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, 1 << 30, 1), &ro)
                .unwrap_err()
                .errno,
            EPERM
        );
        assert_eq!(
            check_request(&req(CMD_WRITE, 0, 1 << 20, 1), &l)
                .unwrap_err()
                .errno,
            ENOSPC
        );
        assert_eq!(
            check_request(&req(CMD_READ, 0, u64::MAX, 1), &l)
                .unwrap_err()
                .errno,
            EINVAL
        );
        assert!(check_request(&req(CMD_READ, 0, 1 << 20, 0), &l).is_ok());
        assert_eq!(
            check_request(&req(CMD_FLUSH, CMD_FLAG_NO_HOLE, 0, 0), &l)
                .unwrap_err()
                .errno,
            EINVAL
        );
        assert!(check_request(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 9), &l).is_ok());
        let simple = Limits {
            structured: false,
            block_status: false,
            ..l
        };
        assert!(check_request(&req(CMD_READ, CMD_FLAG_DF, 0, 1), &simple).is_err());
        assert_eq!(
            check_request(&req(CMD_BLOCK_STATUS, 0, 0, 1), &simple)
                .unwrap_err()
                .msg,
            "CMD_BLOCK_STATUS not negotiated"
        );
        assert!(check_request(&req(99, 0, 0, 0), &l).is_err());
    }

    #[test]
    fn replies() {
        assert_eq!(
            simple_reply(0x0102, EIO),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 1, 2]
        );
        let e = error_chunk(1, EPERM, "no");
        assert_eq!(e.len(), 20 + 6 + 2);
        assert_eq!(&e[16..20], &8u32.to_be_bytes());
        let d = data_chunk_head(1, 512, 4096);
        assert_eq!(&d[16..20], &4104u32.to_be_bytes());
        let bs = block_status_chunk(1, 0, &[(512, STATE_HOLE | STATE_ZERO)]);
        assert_eq!(bs.len(), 20 + 4 + 8);
        assert_eq!(status_reply(false, 1, Some((EIO, "x"))).len(), 16);
        assert_eq!(status_reply(true, 1, None).len(), 20);
        assert_eq!(nbd_errno(libc::EROFS), EPERM);
        assert_eq!(nbd_errno(libc::EDEADLK), EINVAL);
    }

    #[test]
    fn extents_merge_and_cap() {
        let mut v = Vec::new();
        assert!(push_extent(&mut v, 2, 10, 0));
        assert!(push_extent(&mut v, 2, 10, 0));
        assert!(push_extent(&mut v, 2, 5, 3));
        assert!(!push_extent(&mut v, 2, 5, 0));
        assert_eq!(v, vec![(20, 0), (5, 3)]);
        let mut v = vec![(u32::MAX, 0)];
        assert!(!push_extent(&mut v, 1, 1, 0));
    }
}
