//! Fixed newstyle option haggling, over any byte stream, against a
//! [`Catalog`] of exports: everything a client can send before the
//! transmission phase. No socket here, so the fuzz target drives it with
//! arbitrary bytes.

use super::proto::{self, *};
use std::io::{self, Read, Write};

/// Option payloads read into memory up to this size; a longer one is
/// skipped and refused with NBD_REP_ERR_TOO_BIG (no option of ours needs
/// more; QEMU's hard limit, 32 MiB, closes the connection).
pub const MAX_OPTION_PAYLOAD: u32 = 64 << 10;

/// What the handshake tells of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    /// Transmission flags, without NBD_FLAG_SEND_DF (added here when
    /// structured replies are on).
    pub flags: u16,
    pub description: Option<String>,
}

/// The exports a connection may choose from.
pub trait Catalog {
    /// Every export as (name, description), for NBD_OPT_LIST.
    fn list(&self) -> Vec<(String, String)>;
    fn info(&self, name: &str) -> Option<ExportInfo>;
    /// Binds the connection to `name` before the final reply; false when
    /// the export went away meanwhile.
    fn attach(&self, name: &str) -> bool;
}

/// The connection enters transmission with this export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub name: String,
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub block_status: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Go(Negotiated),
    /// NBD_OPT_ABORT: the client leaves.
    Abort,
}

/// Why the connection is dropped during the handshake (logged, not sent).
pub type Fatal = String;

fn io_err(what: &str) -> impl Fn(io::Error) -> Fatal + '_ {
    move |e| format!("{what}: {e}")
}

/// Shortens a client-supplied name for an error message, as QEMU does.
fn sanitize(name: &str) -> String {
    match name.char_indices().nth(80) {
        Some((i, _)) => format!("{}...", &name[..i]),
        None => name.to_string(),
    }
}

struct Haggle<'a, S> {
    io: &'a mut S,
    cat: &'a dyn Catalog,
    flags: ClientFlags,
    structured: bool,
    /// The export `base:allocation` was last set for.
    meta: Option<String>,
}

/// Runs the handshake from the server's greeting to the transmission
/// phase (or the client's abort). `Err`: drop the connection.
pub fn negotiate<S: Read + Write>(io: &mut S, cat: &dyn Catalog) -> Result<End, Fatal> {
    io.write_all(&greeting()).map_err(io_err("write failed"))?;
    io.flush().map_err(io_err("write failed"))?;
    let mut b = [0u8; 4];
    io.read_exact(&mut b)
        .map_err(io_err("read failed (flags)"))?;
    let flags = parse_client_flags(b)?;
    let mut h = Haggle {
        io,
        cat,
        flags,
        structured: false,
        meta: None,
    };
    loop {
        if let Some(end) = h.option()? {
            return Ok(end);
        }
    }
}

impl<S: Read + Write> Haggle<'_, S> {
    /// Handles one option; `Some` ends the handshake.
    fn option(&mut self) -> Result<Option<End>, Fatal> {
        let mut b = [0u8; 16];
        self.io
            .read_exact(&mut b)
            .map_err(io_err("read failed (option)"))?;
        let h = parse_option_header(&b)?;
        if !self.flags.fixed_newstyle && h.opt != OPT_EXPORT_NAME {
            return Err(format!(
                "Unsupported option {} ({})",
                h.opt,
                opt_name(h.opt)
            ));
        }
        if h.opt == OPT_EXPORT_NAME {
            return self.export_name(h.len).map(Some);
        }
        if h.len > MAX_OPTION_PAYLOAD {
            self.skip(u64::from(h.len))?;
            let (kind, msg) = if known(h.opt) {
                (REP_ERR_TOO_BIG, "option too long")
            } else {
                (REP_ERR_UNSUP, "Unsupported option")
            };
            self.error(h.opt, kind, msg)?;
            return Ok(None);
        }
        let mut payload = vec![0u8; h.len as usize];
        self.io
            .read_exact(&mut payload)
            .map_err(io_err("read failed (option data)"))?;
        match h.opt {
            OPT_ABORT => {
                // The client may hang up without reading the reply.
                let _ = self.reply(h.opt, REP_ACK, &[]);
                return Ok(Some(End::Abort));
            }
            OPT_LIST if payload.is_empty() => self.list()?,
            OPT_STARTTLS if payload.is_empty() => {
                self.error(h.opt, REP_ERR_POLICY, "TLS not configured")?
            }
            OPT_STRUCTURED_REPLY if payload.is_empty() => {
                if self.structured {
                    let msg = "structured reply already negotiated";
                    self.error(h.opt, REP_ERR_INVALID, msg)?
                } else {
                    self.structured = true;
                    self.reply(h.opt, REP_ACK, &[])?
                }
            }
            OPT_LIST | OPT_STARTTLS | OPT_STRUCTURED_REPLY => {
                let msg = format!("option '{}' has unexpected length", opt_name(h.opt));
                self.error(h.opt, REP_ERR_INVALID, &msg)?
            }
            OPT_INFO | OPT_GO => return self.info(h.opt, &payload),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta(h.opt, &payload)?,
            _ => {
                let msg = format!("Unsupported option {} ({})", h.opt, opt_name(h.opt));
                self.error(h.opt, REP_ERR_UNSUP, &msg)?
            }
        }
        Ok(None)
    }

    fn reply(&mut self, opt: u32, kind: u32, payload: &[u8]) -> Result<(), Fatal> {
        self.io
            .write_all(&option_reply(opt, kind, payload))
            .and_then(|()| self.io.flush())
            .map_err(io_err("write failed"))
    }

    fn error(&mut self, opt: u32, kind: u32, msg: &str) -> Result<(), Fatal> {
        self.reply(opt, kind, msg.as_bytes())
    }

    fn skip(&mut self, n: u64) -> Result<(), Fatal> {
        let copied = io::copy(&mut (&mut *self.io).take(n), &mut io::sink())
            .map_err(io_err("read failed (option data)"))?;
        if copied < n {
            return Err("read failed (option data): end of stream".into());
        }
        Ok(())
    }

    /// NBD_OPT_EXPORT_NAME: no error can be sent back, so a failure drops
    /// the connection.
    fn export_name(&mut self, len: u32) -> Result<End, Fatal> {
        if len as usize > MAX_STRING {
            return Err("Bad length received".into());
        }
        let mut name = vec![0u8; len as usize];
        self.io
            .read_exact(&mut name)
            .map_err(io_err("read failed (export name)"))?;
        let name = String::from_utf8(name).map_err(|_| "export not found".to_string())?;
        let info = self.cat.info(&name).ok_or("export not found")?;
        if !self.cat.attach(&name) {
            return Err("export not found".into());
        }
        let mut reply = export_info(info.size, self.flags_of(&info)).to_vec();
        if !self.flags.no_zeroes {
            reply.resize(reply.len() + EXPORT_NAME_PAD, 0);
        }
        self.io
            .write_all(&reply)
            .and_then(|()| self.io.flush())
            .map_err(io_err("write failed"))?;
        Ok(End::Go(self.negotiated(name)))
    }

    fn flags_of(&self, info: &ExportInfo) -> u16 {
        if self.structured {
            info.flags | FLAG_SEND_DF
        } else {
            info.flags
        }
    }

    fn negotiated(&self, name: String) -> Negotiated {
        Negotiated {
            block_status: self.structured && self.meta.as_deref() == Some(name.as_str()),
            name,
            structured: self.structured,
        }
    }

    fn list(&mut self) -> Result<(), Fatal> {
        for (name, desc) in self.cat.list() {
            self.reply(OPT_LIST, REP_SERVER, &server_entry(&name, &desc))?;
        }
        self.reply(OPT_LIST, REP_ACK, &[])
    }

    /// NBD_OPT_INFO and NBD_OPT_GO.
    fn info(&mut self, opt: u32, payload: &[u8]) -> Result<Option<End>, Fatal> {
        let r = match parse_info(opt, payload) {
            Ok(r) => r,
            Err(msg) => return self.error(opt, REP_ERR_INVALID, &msg).map(|()| None),
        };
        let Some(info) = self.cat.info(&r.name) else {
            let msg = format!("export '{}' not present", sanitize(&r.name));
            return self.error(opt, REP_ERR_UNKNOWN, &msg).map(|()| None);
        };
        if r.want_name {
            self.send(proto::info_reply(opt, INFO_NAME, r.name.as_bytes()))?;
        }
        if let Some(d) = &info.description {
            self.send(info_reply(opt, INFO_DESCRIPTION, d.as_bytes()))?;
        }
        // Any alignment works (the engine bounces unaligned requests).
        let sizes = block_size_info(1, 4096, MAX_BUFFER);
        self.send(info_reply(opt, INFO_BLOCK_SIZE, &sizes))?;
        let export = export_info(info.size, self.flags_of(&info));
        self.send(info_reply(opt, INFO_EXPORT, &export))?;
        if opt == OPT_GO && !self.cat.attach(&r.name) {
            let msg = format!("export '{}' not present", sanitize(&r.name));
            return self.error(opt, REP_ERR_UNKNOWN, &msg).map(|()| None);
        }
        self.reply(opt, REP_ACK, &[])?;
        Ok((opt == OPT_GO).then(|| End::Go(self.negotiated(r.name))))
    }

    fn send(&mut self, bytes: Vec<u8>) -> Result<(), Fatal> {
        self.io.write_all(&bytes).map_err(io_err("write failed"))
    }

    /// NBD_OPT_LIST_META_CONTEXT and NBD_OPT_SET_META_CONTEXT.
    fn meta(&mut self, opt: u32, payload: &[u8]) -> Result<(), Fatal> {
        let list = opt == OPT_LIST_META_CONTEXT;
        if !list {
            // A new SET replaces the old one, even when it fails.
            self.meta = None;
            if !self.structured {
                let msg = format!(
                    "request option '{}' when structured reply is not negotiated",
                    opt_name(opt)
                );
                return self.error(opt, REP_ERR_INVALID, &msg);
            }
        }
        let m = match parse_meta(opt, payload) {
            Ok(m) => m,
            Err(msg) => return self.error(opt, REP_ERR_INVALID, &msg),
        };
        if self.cat.info(&m.export).is_none() {
            let msg = format!("export '{}' not present", sanitize(&m.export));
            return self.error(opt, REP_ERR_UNKNOWN, &msg);
        }
        if selects_base_allocation(list, &m.queries) {
            // LIST replies carry id 0; ours is 0 as well.
            let entry = meta_context_entry(BASE_ALLOCATION_ID, BASE_ALLOCATION);
            self.reply(opt, REP_META_CONTEXT, &entry)?;
            if !list {
                self.meta = Some(m.export);
            }
        }
        self.reply(opt, REP_ACK, &[])
    }
}

fn known(opt: u32) -> bool {
    matches!(
        opt,
        OPT_ABORT
            | OPT_LIST
            | OPT_STARTTLS
            | OPT_INFO
            | OPT_GO
            | OPT_STRUCTURED_REPLY
            | OPT_LIST_META_CONTEXT
            | OPT_SET_META_CONTEXT
    )
}

/// A client's half of the handshake, for tests: bytes of options.
#[cfg(test)]
pub(crate) fn option(opt: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = OPTS_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    struct Fake;

    impl Catalog for Fake {
        fn list(&self) -> Vec<(String, String)> {
            vec![("d0".into(), String::new()), ("d1".into(), String::new())]
        }
        fn info(&self, name: &str) -> Option<ExportInfo> {
            (name == "d0" || name == "d1").then_some(ExportInfo {
                size: 1 << 20,
                flags: FLAG_HAS_FLAGS | FLAG_READ_ONLY,
                description: None,
            })
        }
        fn attach(&self, name: &str) -> bool {
            name == "d0"
        }
    }

    /// A stream whose input is fixed and whose output is kept.
    struct Pipe {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Pipe {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }

    impl Write for Pipe {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.output.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn run(client: Vec<u8>) -> (Result<End, Fatal>, Vec<u8>) {
        let mut p = Pipe {
            input: Cursor::new(client),
            output: Vec::new(),
        };
        let r = negotiate(&mut p, &Fake);
        (r, p.output)
    }

    fn flags(f: u32) -> Vec<u8> {
        f.to_be_bytes().to_vec()
    }

    /// (option, reply type, payload) of each option reply after the greeting.
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut rest = &out[18..];
        while rest.len() >= 20 {
            assert_eq!(&rest[..8], &REP_MAGIC.to_be_bytes());
            let opt = u32::from_be_bytes(rest[8..12].try_into().unwrap());
            let kind = u32::from_be_bytes(rest[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(rest[16..20].try_into().unwrap()) as usize;
            v.push((opt, kind, rest[20..20 + len].to_vec()));
            rest = &rest[20 + len..];
        }
        v
    }

    fn go(name: &str) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&[0, 0]);
        option(OPT_GO, &p)
    }

    fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        p
    }

    #[test]
    fn go_with_structured_replies_and_block_status() {
        let mut c = flags(3);
        c.extend(option(OPT_STRUCTURED_REPLY, &[]));
        c.extend(option(
            OPT_SET_META_CONTEXT,
            &meta("d0", &["base:allocation", "qemu:x"]),
        ));
        c.extend(go("d0"));
        let (r, out) = run(c);
        assert_eq!(
            r.unwrap(),
            End::Go(Negotiated {
                name: "d0".into(),
                structured: true,
                block_status: true
            })
        );
        let reps = replies(&out);
        assert_eq!(reps[0].1, REP_ACK);
        assert_eq!(reps[1].1, REP_META_CONTEXT);
        assert_eq!(&reps[1].2[4..], b"base:allocation");
        assert_eq!(reps[2].1, REP_ACK);
        // GO: block size, export (with DF), ACK
        assert_eq!(reps[3].1, REP_INFO);
        assert_eq!(&reps[3].2[..2], &INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(&reps[4].2[..2], &INFO_EXPORT.to_be_bytes());
        let f = u16::from_be_bytes([reps[4].2[10], reps[4].2[11]]);
        assert_eq!(f, FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_DF);
        assert_eq!(reps[5].1, REP_ACK);
    }

    #[test]
    fn meta_context_needs_structured_replies_and_a_known_export() {
        let mut c = flags(1);
        c.extend(option(
            OPT_SET_META_CONTEXT,
            &meta("d0", &["base:allocation"]),
        ));
        c.extend(option(OPT_LIST_META_CONTEXT, &meta("nope", &[])));
        c.extend(option(OPT_LIST_META_CONTEXT, &meta("d0", &[])));
        c.extend(go("d0"));
        let (r, out) = run(c);
        let End::Go(n) = r.unwrap() else { panic!() };
        assert!(!n.block_status && !n.structured);
        let reps = replies(&out);
        assert_eq!(reps[0].1, REP_ERR_INVALID);
        assert_eq!(reps[1].1, REP_ERR_UNKNOWN);
        assert_eq!(reps[1].2, b"export 'nope' not present");
        assert_eq!(reps[2].1, REP_META_CONTEXT);
        assert_eq!(reps[3].1, REP_ACK);
    }

    #[test]
    fn list_info_unknown_and_abort() {
        let mut c = flags(1);
        c.extend(option(OPT_LIST, &[]));
        c.extend(option(OPT_LIST, &[1]));
        c.extend(option(OPT_STARTTLS, &[]));
        c.extend(option(77, &[1, 2, 3]));
        c.extend(go("missing"));
        // d1 is listed but cannot be attached (removed meanwhile).
        c.extend(go("d1"));
        c.extend(option(OPT_ABORT, &[]));
        let (r, out) = run(c);
        assert_eq!(r.unwrap(), End::Abort);
        let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            kinds,
            vec![
                REP_SERVER,
                REP_SERVER,
                REP_ACK,
                REP_ERR_INVALID,
                REP_ERR_POLICY,
                REP_ERR_UNSUP,
                REP_ERR_UNKNOWN,
                REP_INFO,
                REP_INFO,
                REP_ERR_UNKNOWN,
                REP_ACK
            ]
        );
    }

    #[test]
    fn export_name_old_clients_and_fatal_errors() {
        let mut c = flags(0);
        c.extend(option(OPT_EXPORT_NAME, b"d0"));
        let (r, out) = run(c);
        assert!(matches!(r.unwrap(), End::Go(_)));
        assert_eq!(out.len(), 18 + 10 + EXPORT_NAME_PAD);
        let mut c = flags(2);
        c.extend(option(OPT_EXPORT_NAME, b"d0"));
        assert_eq!(run(c).1.len(), 18 + 10);
        // Without fixed newstyle only EXPORT_NAME is allowed.
        let mut c = flags(0);
        c.extend(option(OPT_LIST, &[]));
        assert!(run(c).0.is_err());
        let mut c = flags(1);
        c.extend(option(OPT_EXPORT_NAME, b"nope"));
        assert_eq!(run(c).0.unwrap_err(), "export not found");
        assert!(run(flags(8)).0.is_err());
        // Truncated option: the stream ends.
        let mut c = flags(1);
        c.extend(&option(OPT_GO, b"0123")[..18]);
        assert!(run(c).0.is_err());
    }

    #[test]
    fn long_options_are_skipped() {
        let mut c = flags(1);
        c.extend(option(OPT_GO, &vec![0; MAX_OPTION_PAYLOAD as usize + 1]));
        c.extend(option(99, &vec![0; MAX_OPTION_PAYLOAD as usize + 1]));
        c.extend(option(OPT_ABORT, &[]));
        let (r, out) = run(c);
        assert_eq!(r.unwrap(), End::Abort);
        let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(kinds, vec![REP_ERR_TOO_BIG, REP_ERR_UNSUP, REP_ACK]);
    }
}
