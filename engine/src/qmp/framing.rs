//! Cuts a QMP byte stream into top-level JSON texts without parsing them,
//! so one malformed or oversized message costs an error reply, not the
//! connection.

/// Largest message accepted; bigger ones are skipped and reported.
pub const MAX_MESSAGE: usize = 1 << 20;

#[derive(Default)]
pub struct Splitter {
    buf: Vec<u8>,
    depth: usize,
    in_string: bool,
    escape: bool,
    oversize: bool,
}

/// One framed message, or the reason it could not be kept.
pub type Frame = Result<Vec<u8>, String>;

impl Splitter {
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Frame>) {
        for &b in bytes {
            if self.in_string {
                self.keep(b);
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        self.emit(out);
                    }
                }
                continue;
            }
            match b {
                b'"' => {
                    if self.depth == 0 {
                        self.emit(out);
                    }
                    self.in_string = true;
                    self.keep(b);
                }
                b'{' | b'[' => {
                    if self.depth == 0 {
                        self.emit(out);
                    }
                    self.depth += 1;
                    self.keep(b);
                }
                b'}' | b']' => {
                    self.keep(b);
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        self.emit(out);
                    }
                }
                b' ' | b'\t' | b'\r' | b'\n' => {
                    if self.depth == 0 {
                        self.emit(out);
                    } else {
                        self.keep(b);
                    }
                }
                _ => self.keep(b),
            }
        }
    }

    fn keep(&mut self, b: u8) {
        if self.buf.len() >= MAX_MESSAGE {
            self.oversize = true;
            self.buf.clear();
        }
        if !self.oversize {
            self.buf.push(b);
        }
    }

    fn emit(&mut self, out: &mut Vec<Frame>) {
        if self.oversize {
            self.oversize = false;
            out.push(Err(format!(
                "JSON message exceeds the limit of {MAX_MESSAGE} bytes"
            )));
        } else if !self.buf.is_empty() {
            out.push(Ok(std::mem::take(&mut self.buf)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<Frame> {
        let mut s = Splitter::default();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out
    }

    #[test]
    fn splits_objects_across_chunks_and_strings() {
        let out = split(&[b"{\"a\": \"}{\\\"\"", b"}\n{\"b\":[1,{}]} 42 \"x\" "]);
        assert_eq!(out.len(), 4);
        assert_eq!(out[0].as_ref().unwrap(), br#"{"a": "}{\""}"#);
        assert_eq!(out[1].as_ref().unwrap(), br#"{"b":[1,{}]}"#);
        assert_eq!(out[2].as_ref().unwrap(), b"42");
        assert_eq!(out[3].as_ref().unwrap(), b"\"x\"");
    }

    #[test]
    fn oversize_is_reported_once_and_stream_recovers() {
        let mut big = b"{\"x\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_MESSAGE + 10));
        big.extend(b"\"}{\"ok\":1}");
        let out = split(&[&big]);
        assert_eq!(out.len(), 2);
        assert!(out[0].is_err());
        assert_eq!(out[1].as_ref().unwrap(), br#"{"ok":1}"#);
    }

    #[test]
    fn stray_closers_do_not_underflow() {
        let out = split(&[b"}} {\"a\":1}"]);
        assert_eq!(out.last().unwrap().as_ref().unwrap(), br#"{"a":1}"#);
    }
}
