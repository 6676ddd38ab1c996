//! The emulated-device spec string of `vfmig_device_emulated`: the parameters of the CLI's
//! `emu:` device spec, plus `name=`.
//!
//! ```text
//! SPEC  := ["emu:"] PARAM ("," PARAM)*     each key at most once; size is required
//! PARAM := "name=" TEXT | "size=" SIZE | "seed=" U64 | "profile=" (mixed|zero|random|text)
//!        | "precopy=" (SIZE|"off") | "dirty-rate=" SIZE | "p2p=" (on|off)
//!        | "precopy-info=" (v1|v2) | "reinit-after=" SIZE
//!        | "guest=" SIZE "@" IOVA | "guest-dma=" U64 | "quiesce-dma=" U64
//!        | "data-fd=" (fuse|mem)
//! SIZE  := DIGITS [K|M|G|T] [i][B]         binary multiples (K = 1024)
//! IOVA  := "0x" HEX | DIGITS
//! ```
//!
//! `guest=` gives the device guest memory it DMAs into (and `DMA_LOGGING` support):
//! `guest-dma=` pages per second while it runs, `quiesce-dma=` pages written as it quiesces (on
//! entering RUNNING_P2P / PRE_COPY_P2P).
//!
//! `data-fd=mem` gives the memory-speed (pipe) data fd; such a device is STOP_COPY-only, so
//! `precopy=` then defaults to `off` and `precopy=SIZE` is refused.
//!
//! ```text
//! ```

use vfmig_vfio::emulated::{
    DataFdBackend, EmulatedConfig, GuestConfig, PrecopyInfoVersion, Profile,
};

/// Why a spec did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SpecError {
    #[error("{param:?} is not KEY=VALUE")]
    NotKeyValue { param: String },
    #[error("unknown key {key:?}")]
    UnknownKey { key: String },
    #[error("key {key:?} given twice")]
    Repeated { key: String },
    #[error("{key}={value:?}: expected {expected}")]
    BadValue {
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("size= is required")]
    MissingSize,
    #[error("guest-dma= and quiesce-dma= need guest=SIZE@IOVA")]
    DmaWithoutGuest,
    #[error("data-fd=mem is STOP_COPY-only: precopy= must be off")]
    MemWithPrecopy,
}

const KEYS: [&str; 13] = [
    "name",
    "size",
    "seed",
    "profile",
    "precopy",
    "dirty-rate",
    "p2p",
    "precopy-info",
    "reinit-after",
    "guest",
    "guest-dma",
    "quiesce-dma",
    "data-fd",
];

fn size(text: &str) -> Option<u64> {
    let t = text.strip_suffix('B').unwrap_or(text);
    let t = t.strip_suffix('i').unwrap_or(t);
    let (digits, shift) = match t.as_bytes().last()? {
        b'K' | b'k' => (&t[..t.len() - 1], 10),
        b'M' | b'm' => (&t[..t.len() - 1], 20),
        b'G' | b'g' => (&t[..t.len() - 1], 30),
        b'T' | b't' => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn iova(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Parses `spec` into a config. `destination`: the device receives state, so it never dirties.
pub(crate) fn parse(spec: &str, destination: bool) -> Result<EmulatedConfig, SpecError> {
    let mut cfg = EmulatedConfig::default();
    let mut seen = [false; KEYS.len()];
    let mut guest: Option<GuestConfig> = None;
    // guest-dma, quiesce-dma
    let mut dma: (Option<u64>, Option<u64>) = (None, None);
    let body = spec.strip_prefix("emu:").unwrap_or(spec);
    for param in body.split(',').filter(|p| !p.is_empty()) {
        let (key, value) = param
            .split_once('=')
            .ok_or_else(|| SpecError::NotKeyValue {
                param: param.to_owned(),
            })?;
        let slot = KEYS
            .iter()
            .position(|k| *k == key)
            .ok_or_else(|| SpecError::UnknownKey {
                key: key.to_owned(),
            })?;
        if std::mem::replace(&mut seen[slot], true) {
            return Err(SpecError::Repeated {
                key: key.to_owned(),
            });
        }
        let bad = |expected| SpecError::BadValue {
            key: key.to_owned(),
            value: value.to_owned(),
            expected,
        };
        let sz = |expected| size(value).ok_or_else(|| bad(expected));
        match key {
            "name" if !value.is_empty() => cfg.name = value.to_owned(),
            "name" => return Err(bad("a non-empty name")),
            "size" => cfg.size = sz("a size such as 8M")?,
            "seed" => cfg.seed = value.parse().map_err(|_| bad("an unsigned integer"))?,
            "profile" => {
                cfg.profile = match value {
                    "mixed" => Profile::Mixed,
                    "zero" => Profile::Zero,
                    "random" => Profile::Random,
                    "text" => Profile::Text,
                    _ => return Err(bad("mixed, zero, random or text")),
                }
            }
            "precopy" if value == "off" => cfg.precopy = None,
            "precopy" => cfg.precopy = Some(sz("a size or off")?),
            "dirty-rate" => {
                let v = value.strip_suffix("/s").unwrap_or(value);
                cfg.dirty_rate = size(v).ok_or_else(|| bad("a size per second"))?;
            }
            "p2p" => {
                cfg.p2p = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(bad("on or off")),
                }
            }
            "precopy-info" => {
                cfg.precopy_info = match value {
                    "v1" => PrecopyInfoVersion::V1,
                    "v2" => PrecopyInfoVersion::V2,
                    _ => return Err(bad("v1 or v2")),
                }
            }
            "reinit-after" => cfg.reinit_after = Some(sz("a size")?),
            "guest" => {
                let (len, at) = value.split_once('@').ok_or_else(|| bad("SIZE@IOVA"))?;
                guest = Some(GuestConfig {
                    iova: iova(at).ok_or_else(|| bad("SIZE@IOVA"))?,
                    len: size(len).ok_or_else(|| bad("SIZE@IOVA"))?,
                    dma_pages_per_sec: 0,
                    quiesce_dma_pages: 0,
                });
            }
            "data-fd" => {
                cfg.data_fd = DataFdBackend::from_name(value).ok_or_else(|| bad("fuse or mem"))?
            }
            "guest-dma" => {
                dma.0 = Some(value.parse().map_err(|_| bad("pages per second"))?);
            }
            _ => dma.1 = Some(value.parse().map_err(|_| bad("a page count"))?),
        }
    }
    if !seen[1] {
        return Err(SpecError::MissingSize);
    }
    if cfg.data_fd == DataFdBackend::Mem {
        match (seen[4], cfg.precopy) {
            (false, _) => cfg.precopy = None,
            (true, None) => {}
            (true, Some(_)) => return Err(SpecError::MemWithPrecopy),
        }
    }
    match (&mut guest, dma) {
        (Some(g), (rate, quiesce)) => {
            g.dma_pages_per_sec = rate.unwrap_or(0);
            g.quiesce_dma_pages = quiesce.unwrap_or(0);
        }
        (None, (None, None)) => {}
        (None, _) => return Err(SpecError::DmaWithoutGuest),
    }
    cfg.guest = guest;
    if destination {
        cfg.dirty_rate = 0;
        if let Some(g) = &mut cfg.guest {
            g.dma_pages_per_sec = 0;
            g.quiesce_dma_pages = 0;
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_reaches_the_config() {
        let cfg = parse(
            "emu:name=gpu0,size=8M,seed=7,profile=text,precopy=1MiB,dirty-rate=2M/s,p2p=off,\
             precopy-info=v2,reinit-after=64K",
            false,
        )
        .unwrap();
        assert_eq!(cfg.name, "gpu0");
        assert_eq!(cfg.size, 8 << 20);
        assert_eq!(cfg.seed, 7);
        assert_eq!(cfg.profile, Profile::Text);
        assert_eq!(cfg.precopy, Some(1 << 20));
        assert_eq!(cfg.dirty_rate, 2 << 20);
        assert!(!cfg.p2p);
        assert_eq!(cfg.precopy_info, PrecopyInfoVersion::V2);
        assert_eq!(cfg.reinit_after, Some(64 << 10));
    }

    #[test]
    fn guest_memory_and_its_dma() {
        let cfg = parse(
            "size=1M,guest=2M@0x40000000,guest-dma=4000,quiesce-dma=8",
            false,
        )
        .unwrap();
        let g = cfg.guest.unwrap();
        assert_eq!((g.iova, g.len), (0x4000_0000, 2 << 20));
        assert_eq!((g.dma_pages_per_sec, g.quiesce_dma_pages), (4000, 8));
        let d = parse("size=1M,guest=2M@1024,guest-dma=4000", true).unwrap();
        assert_eq!(d.guest.unwrap().dma_pages_per_sec, 0);
        assert_eq!(
            parse("size=1M,guest-dma=5", false),
            Err(SpecError::DmaWithoutGuest)
        );
        assert!(matches!(
            parse("size=1M,guest=2M", false),
            Err(SpecError::BadValue { .. })
        ));
    }

    #[test]
    fn data_fd_mem_is_stop_copy_only() {
        let cfg = parse("size=1M,data-fd=mem", false).unwrap();
        assert_eq!((cfg.data_fd, cfg.precopy), (DataFdBackend::Mem, None));
        assert!(parse("size=1M,data-fd=mem,precopy=off", true).is_ok());
        assert_eq!(
            parse("size=1M,precopy=1M,data-fd=mem", false),
            Err(SpecError::MemWithPrecopy)
        );
        let fuse = parse("size=1M,data-fd=fuse", false).unwrap();
        assert_eq!(
            (fuse.data_fd, fuse.precopy),
            (DataFdBackend::Fuse, Some(u64::MAX))
        );
        assert!(matches!(
            parse("size=1M,data-fd=pipe", false),
            Err(SpecError::BadValue { .. })
        ));
    }

    #[test]
    fn a_destination_never_dirties() {
        let cfg = parse("size=4M,dirty-rate=1M", true).unwrap();
        assert_eq!(cfg.dirty_rate, 0);
        assert_eq!(parse("size=4M,precopy=off", false).unwrap().precopy, None);
    }

    #[test]
    fn bad_specs_are_refused_with_the_fact() {
        assert_eq!(parse("seed=1", false), Err(SpecError::MissingSize));
        assert!(matches!(
            parse("size=4M,size=8M", false),
            Err(SpecError::Repeated { .. })
        ));
        assert!(matches!(
            parse("size=4M,colour=red", false),
            Err(SpecError::UnknownKey { .. })
        ));
        assert!(matches!(
            parse("size=lots", false),
            Err(SpecError::BadValue { .. })
        ));
        assert!(matches!(
            parse("size", false),
            Err(SpecError::NotKeyValue { .. })
        ));
        assert!(matches!(
            parse("size=99999999999T", false),
            Err(SpecError::BadValue { .. })
        ));
    }
}
