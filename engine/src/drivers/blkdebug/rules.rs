//! The rule engine: a state machine driven by events, and the list of
//! armed error rules every request is checked against.
//!
//! It follows block/blkdebug.c: the machine starts in state 1; an event
//! processes the rules of that event whose state is "any" or the current
//! state. An error rule becomes active (the first one activated by this
//! event clears the previously active list), a set-state rule picks the
//! next state, and the state changes once all rules were processed. QEMU
//! keeps each event's rules newest first and pushes activated rules on the
//! front of the active list; the same order is kept here, so the first
//! defined error rule is checked first and, of two set-state rules of one
//! event, the first defined one wins.

use crate::error::{Error, Result};
use crate::options::{BlkdebugEvent, InjectError, SetState};
use parking_lot::Mutex;

/// blkdebug counts `sector` in 512-byte sectors whatever the image's block size.
pub const SECTOR: u64 = 512;

/// Largest errno accepted (Linux's errnos are far below it).
const MAX_ERRNO: i64 = 4095;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Inject {
        errno: i32,
        /// None: any sector.
        sector: Option<u64>,
        once: bool,
        immediately: bool,
    },
    SetState {
        new_state: i64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Rule {
    id: usize,
    event: BlkdebugEvent,
    /// None: any state.
    state: Option<i64>,
    action: Action,
}

/// A failure to inject into a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    pub errno: i32,
    /// Fail in the submitting call rather than from a later completion.
    pub immediately: bool,
}

pub struct Rules {
    st: Mutex<State>,
}

struct State {
    state: i64,
    /// In definition order; a fired `once` rule is removed.
    rules: Vec<Rule>,
    /// Ids of the armed error rules, in check order.
    active: Vec<usize>,
}

/// State 0 means "any", as in QEMU.
fn state_filter(state: Option<i64>) -> Option<i64> {
    state.filter(|&s| s != 0)
}

/// Checks an `inject-error` rule's values (shared by the options and the config file).
pub fn validate_inject(e: &InjectError) -> Result<()> {
    if let Some(errno) = e.errno {
        if !(0..=MAX_ERRNO).contains(&errno) {
            return Err(Error::generic(format!(
                "Invalid errno {errno} for event '{}': it must be between 0 and {MAX_ERRNO}",
                e.event.as_str()
            )));
        }
    }
    if let Some(s) = e.sector {
        if s < -1 {
            return Err(Error::generic(format!(
                "Invalid sector {s} for event '{}': it must be -1 (any) or a sector number",
                e.event.as_str()
            )));
        }
    }
    Ok(())
}

impl Rules {
    pub fn new(inject: &[InjectError], set_state: &[SetState]) -> Result<Rules> {
        let mut rules = Vec::with_capacity(inject.len() + set_state.len());
        for e in inject {
            validate_inject(e)?;
            rules.push(Rule {
                id: rules.len(),
                event: e.event,
                state: state_filter(e.state),
                action: Action::Inject {
                    errno: e.errno.unwrap_or(libc::EIO as i64) as i32,
                    sector: e.sector.and_then(|s| u64::try_from(s).ok()),
                    once: e.once.unwrap_or(false),
                    immediately: e.immediately.unwrap_or(false),
                },
            });
        }
        for s in set_state {
            rules.push(Rule {
                id: rules.len(),
                event: s.event,
                state: state_filter(s.state),
                action: Action::SetState {
                    new_state: s.new_state,
                },
            });
        }
        Ok(Rules {
            st: Mutex::new(State {
                state: 1,
                rules,
                active: Vec::new(),
            }),
        })
    }

    /// The current state of the machine.
    pub fn state(&self) -> i64 {
        self.st.lock().state
    }

    /// Processes the rules of one event.
    pub fn event(&self, ev: BlkdebugEvent) {
        let mut st = self.st.lock();
        let cur = st.state;
        let mut new_state = cur;
        let mut activated = Vec::new();
        // Newest first, as QEMU walks its per-event lists.
        for r in st.rules.iter().rev() {
            if r.event != ev || r.state.is_some_and(|s| s != cur) {
                continue;
            }
            match r.action {
                Action::Inject { .. } => activated.push(r.id),
                Action::SetState { new_state: n } => new_state = n,
            }
        }
        if !activated.is_empty() {
            // Each was pushed on the front of a cleared list: check order is the reverse.
            activated.reverse();
            st.active = activated;
        }
        st.state = new_state;
    }

    /// The failure for a request covering `offset..offset+len`, if an armed
    /// rule matches it. A `once` rule is gone after it fired.
    pub fn check(&self, offset: u64, len: u64) -> Option<Injection> {
        let mut st = self.st.lock();
        let (first, last) = (offset / SECTOR, (offset + len.max(1) - 1) / SECTOR);
        let (pos, rule) = st.active.iter().enumerate().find_map(|(pos, id)| {
            let r = st.rules.iter().find(|r| r.id == *id)?;
            match r.action {
                Action::Inject { sector, .. }
                    if sector.is_none_or(|s| len > 0 && (first..=last).contains(&s)) =>
                {
                    Some((pos, *r))
                }
                _ => None,
            }
        })?;
        let Action::Inject {
            errno,
            once,
            immediately,
            ..
        } = rule.action
        else {
            return None;
        };
        if errno == 0 {
            // QEMU: a matching rule without an errno lets the request through.
            return None;
        }
        if once {
            st.active.remove(pos);
            st.rules.retain(|r| r.id != rule.id);
        }
        Some(Injection { errno, immediately })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BlkdebugEvent::*;

    fn inject(event: BlkdebugEvent) -> InjectError {
        InjectError {
            event,
            state: None,
            errno: None,
            sector: None,
            once: None,
            immediately: None,
        }
    }

    fn set(event: BlkdebugEvent, state: Option<i64>, new_state: i64) -> SetState {
        SetState {
            event,
            state,
            new_state,
        }
    }

    const EIO: Option<Injection> = Some(Injection {
        errno: libc::EIO,
        immediately: false,
    });

    #[test]
    fn nothing_fails_before_the_event() {
        let r = Rules::new(&[inject(ReadAio)], &[]).unwrap();
        assert_eq!(r.check(0, 512), None);
        r.event(WriteAio);
        assert_eq!(r.check(0, 512), None);
        r.event(ReadAio);
        assert_eq!(r.check(0, 512), EIO);
        // Not `once`: it keeps failing.
        assert_eq!(r.check(4096, 512), EIO);
    }

    #[test]
    fn errno_and_immediately_are_reported() {
        let e = InjectError {
            errno: Some(libc::ENOSPC as i64),
            immediately: Some(true),
            ..inject(WriteAio)
        };
        let r = Rules::new(&[e], &[]).unwrap();
        r.event(WriteAio);
        assert_eq!(
            r.check(0, 1),
            Some(Injection {
                errno: libc::ENOSPC,
                immediately: true
            })
        );
    }

    #[test]
    fn errno_zero_lets_requests_through() {
        let e = InjectError {
            errno: Some(0),
            ..inject(ReadAio)
        };
        let r = Rules::new(&[e], &[]).unwrap();
        r.event(ReadAio);
        assert_eq!(r.check(0, 512), None);
    }

    #[test]
    fn sector_matches_only_requests_covering_it() {
        let e = InjectError {
            sector: Some(8),
            ..inject(ReadAio)
        };
        let r = Rules::new(&[e], &[]).unwrap();
        r.event(ReadAio);
        assert_eq!(r.check(0, 4096), None, "sectors 0..=7");
        assert_eq!(r.check(4096, 512), EIO, "exactly sector 8");
        assert_eq!(r.check(4095, 2), EIO, "last byte of 7 and first of 8");
        assert_eq!(r.check(4096 + 511, 1), EIO, "last byte of sector 8");
        assert_eq!(r.check(4096 + 512, 512), None, "sector 9");
        assert_eq!(r.check(0, 1 << 20), EIO, "a big request over it");
        assert_eq!(r.check(4096, 0), None, "an empty request covers nothing");
        // sector -1 is QEMU's "any".
        let e = InjectError {
            sector: Some(-1),
            ..inject(ReadAio)
        };
        let r = Rules::new(&[e], &[]).unwrap();
        r.event(ReadAio);
        assert_eq!(r.check(1 << 30, 512), EIO);
    }

    #[test]
    fn once_fires_once() {
        let e = InjectError {
            once: Some(true),
            ..inject(ReadAio)
        };
        let r = Rules::new(&[e], &[]).unwrap();
        r.event(ReadAio);
        assert_eq!(r.check(0, 512), EIO);
        assert_eq!(r.check(0, 512), None);
        // The rule is gone: the event does not re-arm it.
        r.event(ReadAio);
        assert_eq!(r.check(0, 512), None);
    }

    #[test]
    fn a_once_rule_that_did_not_match_stays_armed() {
        let e = InjectError {
            once: Some(true),
            sector: Some(100),
            ..inject(ReadAio)
        };
        let r = Rules::new(&[e], &[]).unwrap();
        r.event(ReadAio);
        assert_eq!(r.check(0, 512), None);
        assert_eq!(r.check(100 * 512, 512), EIO);
        assert_eq!(r.check(100 * 512, 512), None);
    }

    #[test]
    fn state_machine_gates_rules() {
        let e = InjectError {
            state: Some(2),
            ..inject(L2Update)
        };
        let r = Rules::new(&[e], &[set(ClusterAlloc, Some(1), 2)]).unwrap();
        assert_eq!(r.state(), 1);
        r.event(L2Update);
        assert_eq!(r.check(0, 512), None, "state 1: the rule waits");
        r.event(ClusterAlloc);
        assert_eq!(r.state(), 2);
        r.event(L2Update);
        assert_eq!(r.check(0, 512), EIO);
        // The set-state rule only applies in state 1.
        r.event(ClusterAlloc);
        assert_eq!(r.state(), 2);
    }

    #[test]
    fn rules_see_the_state_before_the_event() {
        // Both rules of one event: the error rule checks the old state (1),
        // even though the same event moves the machine to 2.
        let e = InjectError {
            state: Some(2),
            ..inject(FlushToOs)
        };
        let r = Rules::new(&[e], &[set(FlushToOs, None, 2)]).unwrap();
        r.event(FlushToOs);
        assert_eq!(r.state(), 2);
        assert_eq!(r.check(0, 512), None);
        r.event(FlushToOs);
        assert_eq!(r.check(0, 512), EIO);
        // state 0 means any.
        let e = InjectError {
            state: Some(0),
            ..inject(ReadAio)
        };
        let r = Rules::new(&[e], &[set(WriteAio, None, 7)]).unwrap();
        r.event(WriteAio);
        r.event(ReadAio);
        assert_eq!(r.check(0, 512), EIO);
    }

    #[test]
    fn first_defined_set_state_wins() {
        let r = Rules::new(&[], &[set(ReadAio, None, 5), set(ReadAio, None, 9)]).unwrap();
        r.event(ReadAio);
        assert_eq!(r.state(), 5);
    }

    #[test]
    fn an_event_replaces_the_armed_rules() {
        let a = InjectError {
            errno: Some(libc::EPERM as i64),
            sector: Some(0),
            ..inject(ReadAio)
        };
        let b = InjectError {
            errno: Some(libc::ENOSPC as i64),
            ..inject(ReadAio)
        };
        let c = InjectError {
            errno: Some(libc::EROFS as i64),
            ..inject(WriteAio)
        };
        let r = Rules::new(&[a, b, c], &[]).unwrap();
        r.event(ReadAio);
        // Definition order: `a` first (on sector 0), `b` for anything else.
        assert_eq!(r.check(0, 512).map(|i| i.errno), Some(libc::EPERM));
        assert_eq!(r.check(512, 512).map(|i| i.errno), Some(libc::ENOSPC));
        r.event(WriteAio);
        assert_eq!(r.check(0, 512).map(|i| i.errno), Some(libc::EROFS));
        // An event that arms nothing leaves the list alone.
        r.event(L2Load);
        assert_eq!(r.check(0, 512).map(|i| i.errno), Some(libc::EROFS));
    }

    #[test]
    fn bad_values_are_refused() {
        let e = InjectError {
            errno: Some(-5),
            ..inject(ReadAio)
        };
        let msg = Rules::new(&[e], &[]).err().unwrap().msg;
        assert!(msg.contains("Invalid errno -5"), "{msg}");
        let e = InjectError {
            sector: Some(-2),
            ..inject(ReadAio)
        };
        let msg = Rules::new(&[e], &[]).err().unwrap().msg;
        assert!(msg.contains("Invalid sector -2"), "{msg}");
    }
}
