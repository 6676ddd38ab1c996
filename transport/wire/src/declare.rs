//! Device declarations (protocol version 3, docs/PROTOCOL.md "Device declarations"): what each
//! side says about each of its devices in the handshake, and the rule by which a pair that
//! cannot work is refused there, before any device leaves RUNNING.
//!
//! ```text
//! DeviceDecl := kind u8 | flags u8 (bit 0: size known; others 0) | size u64 LE (0 if unknown)
//!             | compat_len u8 | compat (compat_len bytes of UTF-8, 0..=255)
//! ```
//!
//! The rule ([`check_devices`]): both sides declare the same number of devices; for each pair
//! where neither side is a byte stream ([`DeviceKind::Stream`], e.g. a file, which carries any
//! state) nor [`DeviceKind::Unspecified`], the kinds are equal, the sizes are equal where both
//! are known, and the compatibility identifiers are equal where both are non-empty.

use crate::codec::{Put, Reader, WireCodec};
use crate::handshake::HandshakeError;

/// Bytes of a [`DeviceDecl`] without its compatibility identifier.
pub const DECL_FIXED_LEN: usize = 1 + 1 + 8 + 1;
/// Longest compatibility identifier, in bytes of UTF-8.
pub const MAX_COMPAT: usize = 255;
/// Largest encoded [`DeviceDecl`].
pub const MAX_DECL_LEN: usize = DECL_FIXED_LEN + MAX_COMPAT;

vfmig_enum::int_enum! {
    /// What a device is, as far as pairing goes.
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
    pub enum DeviceKind: u8 {
        /// Not said (a library user that declared nothing): never compared.
        #[default]
        Unspecified = 0 => "unspecified",
        /// A byte stream (a file): carries any device's state, never compared.
        Stream = 1 => "stream",
        /// An emulated device.
        Emulated = 2 => "emulated",
        /// A VFIO device.
        Vfio = 3 => "VFIO",
    }
}

impl DeviceKind {
    /// Whether devices of this kind are compared with their peer.
    fn is_compared(self) -> bool {
        matches!(self, DeviceKind::Emulated | DeviceKind::Vfio)
    }
}

/// One side's declaration of one device.
#[derive(Clone, Debug, PartialEq, Eq, Default, Hash)]
pub struct DeviceDecl {
    /// What it is.
    pub kind: DeviceKind,
    /// Its state size in bytes, where this side knows it exactly (an emulated device's size).
    pub size: Option<u64>,
    /// A compatibility identifier (empty: none), compared byte for byte: e.g. `seed=3
    /// profile=mixed` for an emulated device, `pci 8086:1572 driver vfio-pci` for a VFIO one.
    /// At most [`MAX_COMPAT`] bytes.
    pub compat: String,
}

/// Which declared value differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeclField {
    /// [`DeviceDecl::kind`].
    Kind,
    /// [`DeviceDecl::size`].
    Size,
    /// [`DeviceDecl::compat`].
    Compat,
}

/// A device pair that cannot work: both declarations, to name both values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceMismatch {
    /// Position of the device.
    pub index: usize,
    /// The first value that differs.
    pub field: DeclField,
    /// The source's (client's) declaration.
    pub source: DeviceDecl,
    /// The destination's (server's) declaration.
    pub destination: DeviceDecl,
}

impl DeviceDecl {
    /// Whether it can go on the wire.
    pub fn is_valid(&self) -> bool {
        self.compat.len() <= MAX_COMPAT
    }

    /// Appends the encoding (the caller checked [`DeviceDecl::is_valid`]).
    pub fn encode(&self, out: &mut Vec<u8>) {
        WireCodec::encode(self, out);
    }

    /// Decodes one declaration from the start of `b`; returns it and the bytes it took.
    pub fn decode(b: &[u8]) -> Result<(DeviceDecl, usize), HandshakeError> {
        let mut r = Reader::new(b);
        let d = r.read::<DeviceDecl>()?;
        Ok((d, b.len() - r.left()))
    }
}

/// A field of a declaration past the end of its message.
const SHORT: HandshakeError = HandshakeError::Malformed {
    what: "device declaration shorter than its fields",
};

impl WireCodec for DeviceDecl {
    type Error = HandshakeError;

    fn encode<P: Put + ?Sized>(&self, out: &mut P) {
        out.put_u8(self.kind.code());
        out.put_u8(u8::from(self.size.is_some()));
        out.put_u64(self.size.unwrap_or(0));
        let compat = &self.compat.as_bytes()[..self.compat.len().min(MAX_COMPAT)];
        // At most MAX_COMPAT = 255.
        out.put_u8(u8::try_from(compat.len()).unwrap_or(u8::MAX));
        out.put(compat);
    }

    fn read(r: &mut Reader<'_>) -> Result<DeviceDecl, HandshakeError> {
        let short = |_| SHORT;
        if r.left() < DECL_FIXED_LEN {
            return Err(SHORT);
        }
        let kind =
            DeviceKind::from_code(r.u8().map_err(short)?).ok_or(HandshakeError::Malformed {
                what: "device declaration kind",
            })?;
        let flags = r.u8().map_err(short)?;
        if flags & !1 != 0 {
            return Err(HandshakeError::Malformed {
                what: "device declaration flags",
            });
        }
        let size = r.u64().map_err(short)?;
        if flags == 0 && size != 0 {
            return Err(HandshakeError::Malformed {
                what: "device declaration size without its flag",
            });
        }
        let len = usize::from(r.u8().map_err(short)?);
        let compat = r.take(len).map_err(short)?;
        let compat = std::str::from_utf8(compat)
            .map_err(|_| HandshakeError::Malformed {
                what: "device compatibility identifier not UTF-8",
            })?
            .to_owned();
        Ok(DeviceDecl {
            kind,
            size: (flags & 1 == 1).then_some(size),
            compat,
        })
    }
}

/// Applies the pairing rule (module doc) to the source's and the destination's declarations.
pub fn check_devices(
    source: &[DeviceDecl],
    destination: &[DeviceDecl],
) -> Result<(), HandshakeError> {
    if source.len() != destination.len() {
        return Err(HandshakeError::DeviceCountMismatch {
            source_count: source.len(),
            destination_count: destination.len(),
        });
    }
    for (index, (s, d)) in source.iter().zip(destination).enumerate() {
        if !s.kind.is_compared() || !d.kind.is_compared() {
            continue;
        }
        let field = if s.kind != d.kind {
            Some(DeclField::Kind)
        } else if matches!((s.size, d.size), (Some(a), Some(b)) if a != b) {
            Some(DeclField::Size)
        } else if !s.compat.is_empty() && !d.compat.is_empty() && s.compat != d.compat {
            Some(DeclField::Compat)
        } else {
            None
        };
        if let Some(field) = field {
            return Err(HandshakeError::DeviceMismatch(Box::new(DeviceMismatch {
                index,
                field,
                source: s.clone(),
                destination: d.clone(),
            })));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn emu(size: u64, compat: &str) -> DeviceDecl {
        DeviceDecl {
            kind: DeviceKind::Emulated,
            size: Some(size),
            compat: compat.into(),
        }
    }

    #[test]
    fn declarations_round_trip_and_reject_bad_bytes() {
        for d in [
            DeviceDecl::default(),
            emu(1 << 30, "seed=3 profile=mixed"),
            DeviceDecl {
                kind: DeviceKind::Vfio,
                size: None,
                compat: "pci 8086:1572 driver vfio-pci".into(),
            },
        ] {
            let mut b = Vec::new();
            d.encode(&mut b);
            b.push(0xEE);
            assert_eq!(DeviceDecl::decode(&b), Ok((d, b.len() - 1)));
        }
        assert!(DeviceDecl::decode(&[9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(DeviceDecl::decode(&[2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(DeviceDecl::decode(&[2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
        assert!(DeviceDecl::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, b'a']).is_err());
        assert!(DeviceDecl::decode(&[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xFF]).is_err());
    }

    #[test]
    fn mismatches_name_the_first_differing_value_and_streams_pair_with_anything() {
        let a = emu(64 << 20, "seed=0 profile=mixed");
        let b = emu(128 << 20, "seed=0 profile=mixed");
        let Err(HandshakeError::DeviceMismatch(m)) =
            check_devices(std::slice::from_ref(&a), std::slice::from_ref(&b))
        else {
            panic!("size mismatch expected");
        };
        assert_eq!((m.index, m.field), (0, DeclField::Size));
        assert_eq!((m.source, m.destination), (a.clone(), b));
        let c = emu(64 << 20, "seed=1 profile=mixed");
        assert!(matches!(
            check_devices(std::slice::from_ref(&a), &[c]),
            Err(HandshakeError::DeviceMismatch(m)) if m.field == DeclField::Compat
        ));
        let v = DeviceDecl {
            kind: DeviceKind::Vfio,
            ..DeviceDecl::default()
        };
        assert!(matches!(
            check_devices(std::slice::from_ref(&a), &[v]),
            Err(HandshakeError::DeviceMismatch(m)) if m.field == DeclField::Kind
        ));
        let file = DeviceDecl {
            kind: DeviceKind::Stream,
            size: Some(5),
            compat: String::new(),
        };
        assert_eq!(
            check_devices(std::slice::from_ref(&file), std::slice::from_ref(&a)),
            Ok(())
        );
        assert_eq!(
            check_devices(std::slice::from_ref(&a), &[DeviceDecl::default()]),
            Ok(())
        );
        assert_eq!(
            check_devices(&[a.clone(), file], &[a]),
            Err(HandshakeError::DeviceCountMismatch {
                source_count: 2,
                destination_count: 1
            })
        );
    }
}
