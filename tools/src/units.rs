//! Numbers with units as operators type them: sizes (`512M`, `2G`, `4096`), byte rates for device
//! specs (`64M` = 64 MiB/s) and link rates for `--max-bandwidth` (`2.5G` = 2.5 Gbit/s).
//!
//! | what | example | multiples | unit |
//! |------|---------|-----------|------|
//! | size (`--size`, `emu:size=`, `precopy=`) | `512M`, `2GiB`, `4096` | binary: K = 1024 (`MB` = `MiB`) | bytes |
//! | device byte rate (`dirty-rate=`) | `64M/s` | binary | bytes per second |
//! | link rate (`--max-bandwidth`) | `2.5Gbit/s`, `300MB/s`, `300MiB/s` | decimal (`M` = 10^6) unless `Mi` | bits, or bytes with `B/s` |
//!
//! Sizes describe memory, so a bare number is bytes and `M` is 2^20 (`MB` too, as `dd`, `qemu-img`
//! and `free` read it). Link rates follow `tc`, `ethtool` and NIC data sheets: decimal multiples of
//! bits (`2.5G` = 2.5 Gbit/s); bytes must be spelled `B/s` (`MB/s` decimal, `MiB/s` binary). A bare
//! number is refused for a rate.

use vfmig_pipeline::Rate;

/// Why a number with a unit did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Nothing was given.
    #[error("empty value")]
    Empty,
    /// The numeric part is not a number of the expected form.
    #[error("`{text}` is not a number (expected e.g. {example})")]
    NotANumber {
        /// The text given.
        text: String,
        /// A valid example.
        example: &'static str,
    },
    /// The suffix is not one of the accepted multiples.
    #[error("unknown unit `{suffix}` (accepted: {accepted})")]
    UnknownSuffix {
        /// The suffix given.
        suffix: String,
        /// The accepted suffixes.
        accepted: &'static str,
    },
    /// The value does not fit in 64 bits.
    #[error("`{text}` is too large")]
    Overflow {
        /// The text given.
        text: String,
    },
    /// Zero where zero makes no sense (a bandwidth cap of 0).
    #[error("must be greater than zero")]
    Zero,
    /// A rate given as a bare number: bits or bytes?
    #[error("`{text}` has no unit: write e.g. {text}Mbit/s, {text}MB/s or {text}MiB/s")]
    NoUnit {
        /// The text given.
        text: String,
    },
    /// A size where a rate is expected (`300MB`).
    #[error("`{text}` is a size, not a rate: add /s ({text}/s) or write bits (e.g. 300Mbit/s)")]
    SizeNotRate {
        /// The text given.
        text: String,
    },
}

const SIZE_SUFFIXES: &str =
    "K, M, G, T (powers of 1024; KiB/MiB/GiB/TiB and a trailing B also accepted)";

/// Splits `text` into its leading numeric part (digits and at most one `.`) and the rest.
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_digit() || *c == '.'))
        .map_or(text.len(), |(i, _)| i);
    text.split_at(end)
}

/// The binary multiplier of a size suffix (`K`, `KiB`, `KB`, ... case-insensitive), `None` if unknown.
fn binary_multiplier(suffix: &str) -> Option<u64> {
    let s = suffix.trim().to_ascii_lowercase();
    let s = s
        .strip_suffix("ib")
        .or_else(|| s.strip_suffix('b'))
        .unwrap_or(&s);
    Some(match s {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        _ => return None,
    })
}

/// Parses a byte size: an integer with an optional binary suffix (`4096`, `64K`, `512M`, `2GiB`).
///
/// Fractions are accepted when they give whole bytes (`1.5G`).
pub fn parse_size(text: &str) -> Result<u64, UnitError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(UnitError::Empty);
    }
    let (num, suffix) = split_number(text);
    if num.is_empty() {
        return Err(UnitError::NotANumber {
            text: text.to_owned(),
            example: "512M",
        });
    }
    let mult = binary_multiplier(suffix).ok_or_else(|| UnitError::UnknownSuffix {
        suffix: suffix.to_owned(),
        accepted: SIZE_SUFFIXES,
    })?;
    scale(text, num, mult, "512M")
}

/// `num` (decimal, optional fraction) times `mult`, exactly, in whole units.
fn scale(text: &str, num: &str, mult: u64, example: &'static str) -> Result<u64, UnitError> {
    let not_a_number = || UnitError::NotANumber {
        text: text.to_owned(),
        example,
    };
    let overflow = || UnitError::Overflow {
        text: text.to_owned(),
    };
    let (int, frac) = match num.split_once('.') {
        Some((i, f)) => (i, f),
        None => (num, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(not_a_number());
    }
    if frac.len() > 9 {
        return Err(not_a_number());
    }
    let int_v: u64 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| not_a_number())?
    };
    let whole = int_v.checked_mul(mult).ok_or_else(overflow)?;
    if frac.is_empty() {
        return Ok(whole);
    }
    let frac_v: u128 = frac.parse().map_err(|_| not_a_number())?;
    let denom = 10u128.pow(u32::try_from(frac.len()).map_err(|_| not_a_number())?);
    let part = frac_v * u128::from(mult) / denom;
    let part = u64::try_from(part).map_err(|_| overflow())?;
    whole.checked_add(part).ok_or_else(overflow)
}

/// Parses a byte rate for device specs (`dirty-rate=64M` is 64 MiB/s); a `/s` suffix is allowed.
pub fn parse_byte_rate(text: &str) -> Result<u64, UnitError> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t);
    parse_size(t)
}

/// Accepted spellings of a rate, for messages and help.
pub const RATE_SUFFIXES: &str =
    "Mbit/s, Gbit/s (also kbit/s, Tbit/s, bit/s, and the short forms M, G, \
Mbit, Mbps: bits, powers of 1000); MB/s, GB/s (bytes, powers of 1000); MiB/s, GiB/s (bytes, \
powers of 1024)";

/// Parses a rate (`--max-bandwidth`) into bytes per second.
///
/// - Bits, decimal multiples as link speeds are given: `2.5G`, `2.5Gbit/s`, `10gbps`, `500Mbit`
///   (a multiple with no unit means bits: `2.5G` = 2.5 Gbit/s).
/// - Bytes, decimal: `300MB/s`, `1GBps`; bytes, binary: `300MiB/s`.
///
/// A bare number (`10`) is refused: it would be read as 10 bit/s by some and 10 bytes/s by
/// others. A size without `/s` (`300MB`) is refused too. Zero is refused (omit the option for
/// no cap).
pub fn parse_link_rate(text: &str) -> Result<Rate, UnitError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(UnitError::Empty);
    }
    let (num, suffix) = split_number(t);
    if num.is_empty() {
        return Err(UnitError::NotANumber {
            text: t.to_owned(),
            example: "2.5Gbit/s",
        });
    }
    if suffix.is_empty() {
        return Err(UnitError::NoUnit { text: t.to_owned() });
    }
    let unknown = || UnitError::UnknownSuffix {
        suffix: suffix.to_owned(),
        accepted: RATE_SUFFIXES,
    };
    // Case matters for the unit: `B` means bytes, `b`/`bit` bits; the multiple is case-insensitive.
    let (mult_part, bytes) = if let Some(m) = suffix
        .strip_suffix("B/s")
        .or_else(|| suffix.strip_suffix("Bps"))
    {
        (m, true)
    } else if suffix.ends_with('B') {
        return Err(UnitError::SizeNotRate { text: t.to_owned() });
    } else {
        let lower = suffix.to_ascii_lowercase();
        let keep = ["bit/s", "bits/s", "bps", "bit", "bits", "b/s", "b"]
            .iter()
            .find_map(|u| lower.strip_suffix(u).map(str::len))
            .unwrap_or(lower.len());
        (&suffix[..keep], false)
    };
    let mult: u64 = match (mult_part.to_ascii_lowercase().as_str(), bytes) {
        ("", _) => 1,
        ("k", _) => 1_000,
        ("m", _) => 1_000_000,
        ("g", _) => 1_000_000_000,
        ("t", _) => 1_000_000_000_000,
        ("ki", true) => 1 << 10,
        ("mi", true) => 1 << 20,
        ("gi", true) => 1 << 30,
        ("ti", true) => 1 << 40,
        _ => return Err(unknown()),
    };
    let v = scale(t, num, mult, "2.5Gbit/s")?;
    let rate = if bytes {
        Rate::from_bytes_per_sec(v)
    } else {
        Rate::from_bits_per_sec(v)
    };
    rate.ok_or(UnitError::Zero)
}

/// `1536` -> `1.5 KiB`: binary multiples with one decimal, for sizes.
pub fn human_bytes(bytes: u64) -> String {
    human_bytes_f(bytes as f64)
}

/// [`human_bytes`] for a fractional amount (a rate).
pub fn human_bytes_f(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// `2_500_000_000.0` -> `2.50 Gbit/s`: decimal multiples, for link rates.
pub fn human_bits_f(bits_per_sec: f64) -> String {
    const UNITS: [&str; 5] = ["bit/s", "kbit/s", "Mbit/s", "Gbit/s", "Tbit/s"];
    let mut v = bits_per_sec;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{v:.0} bit/s")
    } else {
        format!("{v:.2} {}", UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sizes_use_binary_multiples_and_accept_common_spellings() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn bad_sizes_name_what_is_wrong() {
        assert_eq!(parse_size(""), Err(UnitError::Empty));
        assert!(
            matches!(parse_size("12X"), Err(UnitError::UnknownSuffix { suffix, .. }) if suffix == "X")
        );
        assert!(matches!(parse_size("M"), Err(UnitError::NotANumber { .. })));
        assert!(matches!(
            parse_size("1.2.3M"),
            Err(UnitError::NotANumber { .. })
        ));
        assert!(matches!(
            parse_size("-5M"),
            Err(UnitError::NotANumber { .. })
        ));
        assert!(matches!(
            parse_size("99999999999999T"),
            Err(UnitError::Overflow { .. })
        ));
    }

    #[test]
    fn link_rates_are_bits_unless_bytes_are_spelled_out() {
        let bps = |t: &str| parse_link_rate(t).map(Rate::bytes_per_sec);
        assert_eq!(bps("2.5G"), Ok(312_500_000));
        assert_eq!(bps("2.5Gbit/s"), Ok(312_500_000));
        assert_eq!(bps("100Mbit/s"), Ok(12_500_000));
        assert_eq!(bps("100MiB/s"), Ok(100 << 20));
        assert_eq!(bps("1GiB/s"), Ok(1 << 30));
        assert_eq!(bps("800bit/s"), Ok(100));
        assert!(matches!(
            parse_link_rate("10"),
            Err(UnitError::NoUnit { .. })
        ));
        assert!(matches!(
            parse_link_rate("300MB"),
            Err(UnitError::SizeNotRate { .. })
        ));
        assert!(matches!(
            parse_link_rate("5Mi"),
            Err(UnitError::UnknownSuffix { .. })
        ));
        assert_eq!(
            parse_link_rate("2.5Gbit").map(Rate::bytes_per_sec),
            Ok(312_500_000)
        );
        assert_eq!(
            parse_link_rate("10gbps").map(Rate::bytes_per_sec),
            Ok(1_250_000_000)
        );
        assert_eq!(
            parse_link_rate("500M").map(Rate::bytes_per_sec),
            Ok(62_500_000)
        );
        assert_eq!(
            parse_link_rate("300MB/s").map(Rate::bytes_per_sec),
            Ok(300_000_000)
        );
        assert_eq!(
            parse_link_rate("1GBps").map(Rate::bytes_per_sec),
            Ok(1_000_000_000)
        );
        assert_eq!(parse_link_rate("0M"), Err(UnitError::Zero));
        assert!(matches!(
            parse_link_rate("5Q"),
            Err(UnitError::UnknownSuffix { .. })
        ));
    }

    #[test]
    fn human_formats_pick_the_largest_fitting_unit() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(512 << 20), "512.0 MiB");
        assert_eq!(human_bits_f(2_500_000_000.0), "2.50 Gbit/s");
    }

    proptest! {
        #[test]
        fn any_size_round_trips_through_every_suffix(v in 0u64..(1 << 20), s in 0usize..5) {
            let (suffix, mult) = [("", 1u64), ("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)][s];
            prop_assert_eq!(parse_size(&format!("{v}{suffix}")), Ok(v * mult));
        }

        #[test]
        fn size_parser_never_panics(text in "\\PC{0,24}") {
            let _ = parse_size(&text);
            let _ = parse_link_rate(&text);
            let _ = parse_byte_rate(&text);
        }
    }
}
