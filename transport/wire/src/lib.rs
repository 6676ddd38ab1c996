//! # vfmig-wire: the vfmig wire protocol (docs/PROTOCOL.md)
//!
//! Owns: frame headers, handshake messages, the deframer. Pure functions over bytes.
//! Never touches: sockets, files, io_uring. Bytes come in from the transport and go back to it.
#![forbid(unsafe_code)]

pub mod error;
pub mod frame;
pub mod handshake;

pub use error::WireError;
pub use frame::{Codec, FrameHeader, FrameKind, HEADER_LEN, MAX_PAYLOAD};
