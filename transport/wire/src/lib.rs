//! # vfmig-wire: the vfmig wire protocol (docs/PROTOCOL.md)
//!
//! Owns: the 40-byte frame header ([`frame`]), typed control frames ([`control`]), the
//! incremental [`Deframer`], the sans-IO handshake with PSK authentication ([`handshake`]), and
//! the key derivation and AES-256-GCM sealing of frames on PSK connections ([`seal`]).
//! Pure functions and state machines over bytes. It is the only place that knows the byte
//! layouts: every field is read and written through [`codec`], and a transport that must look
//! into raw header bytes (to name a frame whose header does not decode) uses [`HeaderBytes`].
//!
//! Never touches: sockets, files, io_uring, clocks or randomness (nonces and session ids are
//! passed in by the transport).
//!
//! Data in: bytes the transport read from a connection (`Handshake::feed`, `Deframer::feed`,
//! `FrameHeader::decode` + `verify`, or [`HeaderBytes`], for the io_uring path that reads header
//! and payload into a registered buffer). Data out: bytes to write (`Handshake::take_output`,
//! `FrameHeader::encode`, `Control::encode`), and typed frames, agreements and errors.
#![forbid(unsafe_code)]

pub mod codec;
pub mod control;
pub mod declare;
pub mod deframer;
pub mod error;
pub mod frame;
pub mod handshake;
pub mod seal;

pub use control::{AbortReason, Control, FinalOutcome};
pub use deframer::{Deframer, Frame};
pub use error::WireError;
pub use frame::{
    page_map_len, Codec, FrameHeader, FrameKind, HeaderBytes, DIGEST_LEN, FLAG_HASH_TRAILER,
    HASH_TRAILER_LEN, HEADER_LEN, MAP_GRANULE, MAX_ABORT_DETAIL, MAX_PAYLOAD, PAGE_SIZE,
};
pub use seal::{FrameProtection, SessionKeys};
