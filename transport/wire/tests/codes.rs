//! Every integer <-> enum table of the protocol (`vfmig_enum::int_enum!`): each code round-trips,
//! unknown codes are refused (closed tables) or carried (open tables), and the names `name()` /
//! `Display` give are the names docs/PROTOCOL.md gives.

use vfmig_wire::declare::DeviceKind;
use vfmig_wire::handshake::{AuthMode, MsgType, RefuseCode};
use vfmig_wire::{AbortReason, Codec, FinalOutcome, FrameKind, FrameProtection};

const PROTOCOL: &str = include_str!("../../../docs/PROTOCOL.md");

/// Every `u8` either is a known value and round-trips, or is refused with the value.
macro_rules! closed_u8 {
    ($t:ty) => {{
        let mut known = Vec::new();
        for v in 0..=u8::MAX {
            match <$t>::try_from(v) {
                Ok(k) => {
                    assert_eq!((k.code(), u8::from(k)), (v, v), "{k:?}");
                    assert_eq!(<$t>::from_code(v), Some(k));
                    known.push(k);
                }
                Err(e) => {
                    assert_eq!(e.value, v);
                    assert_eq!(<$t>::from_code(v), None);
                }
            }
        }
        assert_eq!(known, <$t>::ALL, "ALL is every known value, in code order");
        for k in <$t>::ALL {
            assert_eq!(k.to_string(), k.name(), "{k:?}");
        }
    }};
}

/// Every `u16` round-trips; the known ones are `ALL`, the rest are carried as unknown.
macro_rules! open_u16 {
    ($t:ty) => {{
        let mut known = Vec::new();
        for v in 0..=u16::MAX {
            let k = <$t>::from(v);
            assert_eq!((k.code(), u16::from(k)), (v, v));
            if k.is_known() {
                known.push(k);
            } else {
                assert_eq!(k.name(), "Unknown");
            }
        }
        assert_eq!(known, <$t>::ALL, "ALL is every known value, in code order");
    }};
}

fn documented(needle: &str) {
    assert!(
        PROTOCOL.contains(needle),
        "docs/PROTOCOL.md does not say {needle:?}"
    );
}

#[test]
fn closed_tables_round_trip_and_refuse_unknown_codes() {
    closed_u8!(FrameKind);
    closed_u8!(Codec);
    closed_u8!(FrameProtection);
    closed_u8!(DeviceKind);
    closed_u8!(MsgType);
    closed_u8!(AuthMode);
    // Discriminants are the codes, so `as` still gives the wire byte.
    assert_eq!(FrameKind::InitialDataSent as u8, 12);
    assert_eq!(Codec::PagedLz4 as u8, 6);
}

#[test]
fn open_tables_carry_unknown_codes() {
    open_u16!(AbortReason);
    open_u16!(FinalOutcome);
    open_u16!(RefuseCode);
    // Display of the unknown ones; AbortReason keeps its own Display.
    assert_eq!(FinalOutcome::Unknown(77).to_string(), "Unknown(77)");
    assert_eq!(RefuseCode::Unknown(0).to_string(), "Unknown(0)");
    assert_eq!(AbortReason::Cancelled.to_string(), "Cancelled (1)");
    assert_eq!(AbortReason::Unknown(99).to_string(), "unknown reason 99");
}

#[test]
fn names_are_the_names_protocol_md_gives() {
    // Section 5 and 6 tables: `| name | value |`.
    for k in FrameKind::ALL {
        documented(&format!("| {k} | {} |", k.code()));
    }
    for c in Codec::ALL {
        documented(&format!("| {c} | {} |", c.code()));
    }
    // Section 5 (abort reasons) and 9 (refusal codes) tables: `| code | name |`.
    for r in AbortReason::ALL {
        documented(&format!("| {} | {} |", r.code(), r.name()));
    }
    for r in RefuseCode::ALL {
        documented(&format!("| {} | {r} |", r.code()));
    }
    // Section 2.1, the envelope's type field.
    let types = PROTOCOL
        .lines()
        .find(|l| l.contains("type ") && l.contains("ClientHello,"))
        .expect("the envelope's type line");
    for t in MsgType::ALL {
        assert!(types.contains(&format!("{} {t}", t.code())), "{t:?}");
        documented(&format!("{t} (type {})", t.code()));
    }
    // Section 5.1, the outcome codes.
    for o in FinalOutcome::ALL {
        documented(&format!("{} {o} (", o.code()));
    }
    // Sections 2.3, 2.4 and 2.7, the layouts.
    for m in AuthMode::ALL {
        documented(&format!("{} = {m}", m.code()));
    }
    for p in FrameProtection::ALL {
        documented(&format!("{} = {p}", p.code()));
    }
    let kinds = PROTOCOL
        .lines()
        .find(|l| l.contains("kind ") && l.contains("0 unspecified"))
        .expect("the declaration's kind line");
    for k in DeviceKind::ALL {
        assert!(kinds.contains(&format!("{} {k}", k.code())), "{k:?}");
    }
}
