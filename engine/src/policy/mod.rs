//! Device-level policies: throttling ([`throttle`], timed by [`timer`]) and
//! error handling ([`errors`]). Zero detection and accounting sit in the
//! device itself ([`crate::device`], [`crate::stats`]).

pub mod errors;
pub mod throttle;
pub mod timer;
