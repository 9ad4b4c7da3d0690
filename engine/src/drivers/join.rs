//! Gathering the pieces of a multi-segment read, shared by the formats.

use super::Done;
use crate::error::{Error, Result};
use crate::io::Buf;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Gathers the pieces of a multi-segment read into the caller's buffer.
pub struct Join {
    state: Mutex<JoinState>,
    left: AtomicUsize,
}

struct JoinState {
    out: Option<Buf>,
    err: Option<Error>,
    done: Option<Done<Buf>>,
}

impl Join {
    pub fn new(out: Buf, parts: usize, done: Done<Buf>) -> Arc<Join> {
        Arc::new(Join {
            state: Mutex::new(JoinState {
                out: Some(out),
                err: None,
                done: Some(done),
            }),
            left: AtomicUsize::new(parts),
        })
    }

    /// Copies one piece (or records its error) at `at`; the last one completes.
    pub fn fill(&self, at: usize, r: Result<Buf>) {
        {
            let mut st = self.state.lock();
            match r {
                Ok(piece) => {
                    if let Some(out) = st.out.as_mut() {
                        out[at..at + piece.len()].copy_from_slice(&piece);
                    }
                }
                Err(e) => {
                    st.err.get_or_insert(e);
                }
            }
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let mut st = self.state.lock();
            let (out, err, done) = (st.out.take(), st.err.take(), st.done.take());
            drop(st);
            if let Some(done) = done {
                done(match (err, out) {
                    (Some(e), _) => Err(e),
                    (None, Some(b)) => Ok(b),
                    (None, None) => Err(Error::io(libc::EIO, "read buffer lost")),
                });
            }
        }
    }
}
