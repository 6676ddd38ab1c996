//! Device specs as given to `--device`: parsed into typed values, with typed errors.
//!
//! ```text
//! SPEC    := "emu:" PARAMS | "file:" PATH | "vfio:" PATH
//! PARAMS  := PARAM ("," PARAM)*           each key at most once; `size` is required
//! PARAM   := "size=" SIZE | "seed=" U64 | "profile=" ("mixed"|"zero"|"random"|"text")
//!          | "precopy=" (SIZE|"off") | "dirty-rate=" SIZE ["/s"] | "p2p=" ("on"|"off")
//!          | "precopy-info=" ("v1"|"v2") | "reinit-after=" SIZE
//!          | "read-error-at=" SIZE | "slow=" SIZE ["/s"]      (injected faults, for tests)
//!          | "refuse-resume=" ("off"|"on")
//!          | "data-fd=" ("fuse"|"mem")       the data fd: FUSE file (default) or memory-speed pipe
//! SIZE    := DIGITS ["." DIGITS] [K|M|G|T] [i][B]   binary multiples (K = 1024)
//! ```
//!
//! `data-fd=mem` makes a STOP_COPY-only device (no PRE_COPY capability: `precopy=` defaults to
//! `off` and `precopy=SIZE` is refused, as is `read-error-at=`); see
//! [`DataFdBackend::Mem`].
//!
//! [`DeviceSpec`]'s `Display` prints the canonical form, which parses back to the same value.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::units::{parse_byte_rate, parse_size, UnitError};

/// Content profile of an emulated device (`profile=`): the emulated device's own type.
pub use vfmig_vfio::emulated::Profile;

/// The kind of data fd of an emulated device (`data-fd=`): the emulated device's own type.
pub use vfmig_vfio::emulated::DataFdBackend;

/// PRE_COPY of an emulated device (`precopy=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Precopy {
    /// Key omitted: the device has PRE_COPY and all of its state is initial data.
    #[default]
    Whole,
    /// `precopy=off`: no `VFIO_MIGRATION_PRE_COPY`.
    Off,
    /// `precopy=SIZE`: PRE_COPY with the first SIZE bytes as `initial_bytes`.
    Initial(u64),
}

/// An emulated device (`emu:size=...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmuSpec {
    /// STOP_COPY state size in bytes.
    pub size: u64,
    /// Content seed; `None` lets the command pick one per device position.
    pub seed: Option<u64>,
    /// Content profile.
    pub profile: Profile,
    /// PRE_COPY support and its initial bytes.
    pub precopy: Precopy,
    /// Bytes per second the running device dirties; `None` = no dirtying.
    pub dirty_rate: Option<u64>,
    /// Whether the device supports RUNNING_P2P (`VFIO_MIGRATION_P2P`). Default on.
    pub p2p: bool,
    /// `precopy-info=v2`: the device offers `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (REINIT
    /// reporting). Default v1.
    pub precopy_info_v2: bool,
    /// `reinit-after=SIZE`: the device re-initialises once in PRE_COPY, after SIZE stream bytes
    /// and a report of `initial_bytes` 0 (its initial data must then be read again).
    pub reinit_after: Option<u64>,
    /// `read-error-at=SIZE` (fault injection): a read of the saving data fd fails with EIO once
    /// stream byte SIZE is reached.
    pub read_error_at: Option<u64>,
    /// `slow=SIZE/s` (fault injection): the saving data fd delivers at most SIZE bytes per second.
    pub slow: Option<u64>,
    /// `refuse-resume=on` (fault injection): RESUMING -> STOP fails even for a valid stream.
    pub refuse_resume: bool,
    /// `data-fd=fuse|mem`: a FUSE file (default) or the memory-speed pipe (STOP_COPY-only).
    pub data_fd: DataFdBackend,
}

/// Where a `file:` device's bytes come from or go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileTarget {
    /// `-`: standard input (source side only).
    Stdio,
    /// A path: a regular file or a FIFO on the source, the file to create on the destination.
    Path(PathBuf),
}

impl fmt::Display for FileTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileTarget::Stdio => f.write_str("-"),
            FileTarget::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// One `--device` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `emu:...`
    Emu(EmuSpec),
    /// `file:PATH`
    File(FileTarget),
    /// `vfio:PATH`: a VFIO cdev (`/dev/vfio/devices/vfioN`) or a sysfs device path.
    Vfio(PathBuf),
}

impl DeviceSpec {
    /// `emu`, `file` or `vfio`, as used in messages and reports.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceSpec::Emu(_) => "emu",
            DeviceSpec::File(_) => "file",
            DeviceSpec::Vfio(_) => "vfio",
        }
    }
}

/// Why a device spec did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The spec was empty.
    #[error("empty device spec (expected emu:..., file:PATH or vfio:PATH)")]
    Empty,
    /// The part before `:` is not a known device kind.
    #[error("unknown device kind `{kind}` (expected emu, file or vfio)")]
    UnknownKind {
        /// What was given.
        kind: String,
    },
    /// `file:` or `vfio:` without a path.
    #[error("{kind}: needs a path, e.g. {kind}:{example}")]
    MissingPath {
        /// The device kind.
        kind: &'static str,
        /// An example path.
        example: &'static str,
    },
    /// A parameter name the kind does not have.
    #[error(
        "unknown key `{key}` (emu accepts size, seed, profile, precopy, dirty-rate, p2p, \
         precopy-info, reinit-after, read-error-at, slow, refuse-resume, data-fd)"
    )]
    UnknownKey {
        /// What was given.
        key: String,
    },
    /// The same key twice.
    #[error("key `{key}` given twice")]
    DuplicateKey {
        /// The key.
        key: &'static str,
    },
    /// `key` without `=value`, or with an empty value.
    #[error("key `{key}` needs a value (`{key}=...`)")]
    MissingValue {
        /// The key.
        key: String,
    },
    /// An empty parameter (`,,` or a trailing comma).
    #[error("empty parameter (stray comma)")]
    EmptyParam,
    /// A required key is absent.
    #[error("missing `{key}=` (e.g. emu:{key}=512M)")]
    MissingKey {
        /// The key.
        key: &'static str,
    },
    /// A size or rate did not parse.
    #[error("bad {key} `{value}`: {source}")]
    BadSize {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// Why.
        #[source]
        source: UnitError,
    },
    /// A plain number did not parse.
    #[error("bad {key} `{value}`: expected an unsigned integer")]
    BadNumber {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
    },
    /// A value outside its set of choices.
    #[error("bad {key} `{value}` (expected one of: {})", allowed.join(", "))]
    BadChoice {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// The accepted values.
        allowed: &'static [&'static str],
    },
    /// A size above what an emulated device can hold.
    #[error("size {size} is larger than an emulated device can be ({max} bytes = 1 TiB)")]
    TooLarge {
        /// The size given.
        size: u64,
        /// The largest size.
        max: u64,
    },
    /// `size=0`: a device with no state cannot be migrated meaningfully.
    #[error("size must be greater than zero")]
    ZeroSize,
    /// `data-fd=mem` with a key the memory-speed data fd cannot honour.
    #[error("data-fd=mem cannot be combined with `{key}` ({why})")]
    MemConflict {
        /// The conflicting key.
        key: &'static str,
        /// Why.
        why: &'static str,
    },
    /// The emulated device streams whole 4 KiB pages.
    #[error("size {size} is not a multiple of 4 KiB")]
    UnalignedSize {
        /// The size given.
        size: u64,
    },
}

#[derive(Clone, Copy)]
enum EmuKey {
    Size,
    Seed,
    Profile,
    Precopy,
    DirtyRate,
    P2p,
    PrecopyInfo,
    ReinitAfter,
    ReadErrorAt,
    Slow,
    RefuseResume,
    DataFd,
}

const EMU_KEYS: [(&str, EmuKey); 12] = [
    ("size", EmuKey::Size),
    ("seed", EmuKey::Seed),
    ("profile", EmuKey::Profile),
    ("precopy", EmuKey::Precopy),
    ("dirty-rate", EmuKey::DirtyRate),
    ("p2p", EmuKey::P2p),
    ("precopy-info", EmuKey::PrecopyInfo),
    ("reinit-after", EmuKey::ReinitAfter),
    ("read-error-at", EmuKey::ReadErrorAt),
    ("slow", EmuKey::Slow),
    ("refuse-resume", EmuKey::RefuseResume),
    ("data-fd", EmuKey::DataFd),
];

impl FromStr for DeviceSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        if s.is_empty() {
            return Err(SpecError::Empty);
        }
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "emu" => parse_emu(rest).map(DeviceSpec::Emu),
            "file" => match rest {
                "" => Err(SpecError::MissingPath {
                    kind: "file",
                    example: "/var/tmp/state.bin",
                }),
                "-" => Ok(DeviceSpec::File(FileTarget::Stdio)),
                p => Ok(DeviceSpec::File(FileTarget::Path(PathBuf::from(p)))),
            },
            "vfio" => match rest {
                "" => Err(SpecError::MissingPath {
                    kind: "vfio",
                    example: "/dev/vfio/devices/vfio0",
                }),
                p => Ok(DeviceSpec::Vfio(PathBuf::from(p))),
            },
            other => Err(SpecError::UnknownKind {
                kind: other.to_owned(),
            }),
        }
    }
}

fn parse_emu(params: &str) -> Result<EmuSpec, SpecError> {
    let mut seen = [false; EMU_KEYS.len()];
    let mut size = None;
    let mut spec = EmuSpec {
        size: 0,
        seed: None,
        profile: Profile::default(),
        precopy: Precopy::Whole,
        dirty_rate: None,
        p2p: true,
        precopy_info_v2: false,
        reinit_after: None,
        read_error_at: None,
        slow: None,
        refuse_resume: false,
        data_fd: DataFdBackend::Fuse,
    };
    if !params.is_empty() {
        for param in params.split(',') {
            if param.is_empty() {
                return Err(SpecError::EmptyParam);
            }
            let (key, value) = param.split_once('=').unwrap_or((param, ""));
            let idx = EMU_KEYS
                .iter()
                .position(|(k, _)| *k == key)
                .ok_or_else(|| SpecError::UnknownKey {
                    key: key.to_owned(),
                })?;
            let (key, which) = EMU_KEYS[idx];
            if seen[idx] {
                return Err(SpecError::DuplicateKey { key });
            }
            seen[idx] = true;
            if value.is_empty() {
                return Err(SpecError::MissingValue {
                    key: key.to_owned(),
                });
            }
            let bad_size = |source| SpecError::BadSize {
                key,
                value: value.to_owned(),
                source,
            };
            match which {
                EmuKey::Size => {
                    let v = parse_size(value).map_err(bad_size)?;
                    if v == 0 {
                        return Err(SpecError::ZeroSize);
                    }
                    if v % 4096 != 0 {
                        return Err(SpecError::UnalignedSize { size: v });
                    }
                    if v > vfmig_vfio::emulated::MAX_SIZE {
                        return Err(SpecError::TooLarge {
                            size: v,
                            max: vfmig_vfio::emulated::MAX_SIZE,
                        });
                    }
                    size = Some(v);
                }
                EmuKey::Seed => {
                    spec.seed = Some(value.parse().map_err(|_| SpecError::BadNumber {
                        key,
                        value: value.to_owned(),
                    })?);
                }
                EmuKey::Profile => {
                    spec.profile =
                        Profile::from_name(value).ok_or_else(|| SpecError::BadChoice {
                            key,
                            value: value.to_owned(),
                            allowed: Profile::NAMES,
                        })?;
                }
                EmuKey::Precopy => {
                    spec.precopy = match value {
                        "off" => Precopy::Off,
                        v => Precopy::Initial(parse_size(v).map_err(bad_size)?),
                    }
                }
                EmuKey::DirtyRate => {
                    spec.dirty_rate = Some(parse_byte_rate(value).map_err(bad_size)?)
                }
                EmuKey::PrecopyInfo => spec.precopy_info_v2 = yes_no(key, value, &["v1", "v2"])?,
                EmuKey::ReinitAfter => {
                    spec.reinit_after = Some(parse_size(value).map_err(bad_size)?)
                }
                EmuKey::P2p => spec.p2p = yes_no(key, value, &["off", "on"])?,
                EmuKey::ReadErrorAt => {
                    spec.read_error_at = Some(parse_size(value).map_err(bad_size)?)
                }
                EmuKey::Slow => spec.slow = Some(parse_byte_rate(value).map_err(bad_size)?),
                EmuKey::RefuseResume => spec.refuse_resume = yes_no(key, value, &["off", "on"])?,
                EmuKey::DataFd => {
                    spec.data_fd =
                        DataFdBackend::from_name(value).ok_or_else(|| SpecError::BadChoice {
                            key,
                            value: value.to_owned(),
                            allowed: DataFdBackend::NAMES,
                        })?;
                }
            }
        }
    }
    spec.size = size.ok_or(SpecError::MissingKey { key: "size" })?;
    if spec.data_fd == DataFdBackend::Mem {
        match spec.precopy {
            // The memory-speed data fd is STOP_COPY-only: no PRE_COPY unless asked for.
            Precopy::Whole | Precopy::Off => spec.precopy = Precopy::Off,
            Precopy::Initial(_) => {
                return Err(SpecError::MemConflict {
                    key: "precopy",
                    why: "the memory-speed data fd is STOP_COPY-only; use precopy=off",
                })
            }
        }
        if spec.read_error_at.is_some() {
            return Err(SpecError::MemConflict {
                key: "read-error-at",
                why: "a pipe cannot fail a read with EIO",
            });
        }
    }
    Ok(spec)
}

/// A two-valued key: `[no, yes]` spellings, in the order the error message lists them.
fn yes_no(
    key: &'static str,
    value: &str,
    names: &'static [&'static str; 2],
) -> Result<bool, SpecError> {
    match names.iter().position(|n| *n == value) {
        Some(i) => Ok(i == 1),
        None => Err(SpecError::BadChoice {
            key,
            value: value.to_owned(),
            allowed: names,
        }),
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Emu(e) => {
                write!(f, "emu:size={}", e.size)?;
                if let Some(seed) = e.seed {
                    write!(f, ",seed={seed}")?;
                }
                write!(f, ",profile={}", e.profile.as_str())?;
                match e.precopy {
                    Precopy::Whole => {}
                    Precopy::Off => f.write_str(",precopy=off")?,
                    Precopy::Initial(p) => write!(f, ",precopy={p}")?,
                }
                if let Some(r) = e.dirty_rate {
                    write!(f, ",dirty-rate={r}")?;
                }
                write!(f, ",p2p={}", if e.p2p { "on" } else { "off" })?;
                if e.precopy_info_v2 {
                    f.write_str(",precopy-info=v2")?;
                }
                if let Some(n) = e.reinit_after {
                    write!(f, ",reinit-after={n}")?;
                }
                if let Some(n) = e.read_error_at {
                    write!(f, ",read-error-at={n}")?;
                }
                if let Some(r) = e.slow {
                    write!(f, ",slow={r}/s")?;
                }
                if e.refuse_resume {
                    f.write_str(",refuse-resume=on")?;
                }
                if e.data_fd != DataFdBackend::Fuse {
                    write!(f, ",data-fd={}", e.data_fd)?;
                }
                Ok(())
            }
            DeviceSpec::File(t) => write!(f, "file:{t}"),
            DeviceSpec::Vfio(p) => write!(f, "vfio:{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse(s: &str) -> Result<DeviceSpec, SpecError> {
        s.parse()
    }

    #[test]
    fn emu_spec_with_every_key_parses_to_typed_values() {
        let spec = parse("emu:size=512M,seed=7,profile=text,precopy=64M,dirty-rate=8M/s,p2p=off");
        assert_eq!(
            spec,
            Ok(DeviceSpec::Emu(EmuSpec {
                size: 512 << 20,
                seed: Some(7),
                profile: Profile::Text,
                precopy: Precopy::Initial(64 << 20),
                dirty_rate: Some(8 << 20),
                p2p: false,
                precopy_info_v2: false,
                reinit_after: None,
                read_error_at: None,
                slow: None,
                refuse_resume: false,
                data_fd: DataFdBackend::Fuse,
            }))
        );
    }

    #[test]
    fn fault_keys_parse_and_print_back() {
        let Ok(DeviceSpec::Emu(e)) =
            parse("emu:size=1M,read-error-at=64K,slow=2M/s,refuse-resume=on")
        else {
            panic!("fault keys refused");
        };
        assert_eq!((e.read_error_at, e.slow), (Some(64 << 10), Some(2 << 20)));
        assert!(e.refuse_resume);
        let again = parse(&DeviceSpec::Emu(e.clone()).to_string());
        assert_eq!(again, Ok(DeviceSpec::Emu(e)));
        assert!(parse("emu:size=1M,read-error-at=x").is_err());
    }

    #[test]
    fn precopy_info_and_reinit_after_parse_and_refuse_other_versions() {
        let Ok(DeviceSpec::Emu(e)) = parse("emu:size=1M,precopy-info=v2,reinit-after=64K") else {
            panic!("must parse");
        };
        assert!(e.precopy_info_v2);
        assert_eq!(e.reinit_after, Some(64 << 10));
        let Ok(DeviceSpec::Emu(e)) = parse("emu:size=1M,precopy-info=v1") else {
            panic!("must parse");
        };
        assert_eq!((e.precopy_info_v2, e.reinit_after), (false, None));
        assert!(matches!(
            parse("emu:size=1M,precopy-info=v3"),
            Err(SpecError::BadChoice {
                key: "precopy-info",
                ..
            })
        ));
        assert!(matches!(
            parse("emu:size=1M,reinit-after=lots"),
            Err(SpecError::BadSize {
                key: "reinit-after",
                ..
            })
        ));
    }

    #[test]
    fn emu_defaults_are_mixed_p2p_on_whole_state_precopy() {
        let Ok(DeviceSpec::Emu(e)) = parse("emu:size=1G") else {
            panic!("emu:size=1G must parse");
        };
        assert_eq!(e.size, 1 << 30);
        assert_eq!(
            (e.seed, e.profile, e.precopy, e.dirty_rate, e.p2p),
            (None, Profile::Mixed, Precopy::Whole, None, true)
        );
    }

    #[test]
    fn data_fd_parses_defaults_to_fuse_and_mem_is_stop_copy_only() {
        let Ok(DeviceSpec::Emu(e)) = parse("emu:size=1M") else {
            panic!("must parse");
        };
        assert_eq!(e.data_fd, DataFdBackend::Fuse);
        let Ok(DeviceSpec::Emu(e)) = parse("emu:size=1M,data-fd=fuse") else {
            panic!("must parse");
        };
        assert_eq!(
            (e.data_fd, e.precopy),
            (DataFdBackend::Fuse, Precopy::Whole)
        );
        // mem: precopy defaults to off, and prints back as such.
        let spec = parse("emu:size=1M,data-fd=mem").unwrap();
        let DeviceSpec::Emu(e) = &spec else {
            panic!("emu");
        };
        assert_eq!((e.data_fd, e.precopy), (DataFdBackend::Mem, Precopy::Off));
        assert_eq!(
            spec.to_string(),
            "emu:size=1048576,profile=mixed,precopy=off,p2p=on,data-fd=mem"
        );
        assert_eq!(parse(&spec.to_string()), Ok(spec));
        assert!(parse("emu:size=1M,precopy=off,data-fd=mem").is_ok());
        assert_eq!(
            parse("emu:size=1M,data-fd=mem,precopy=1M"),
            Err(SpecError::MemConflict {
                key: "precopy",
                why: "the memory-speed data fd is STOP_COPY-only; use precopy=off",
            })
        );
        assert!(matches!(
            parse("emu:size=1M,data-fd=mem,read-error-at=4K"),
            Err(SpecError::MemConflict {
                key: "read-error-at",
                ..
            })
        ));
        assert!(matches!(
            parse("emu:size=1M,data-fd=pipe"),
            Err(SpecError::BadChoice { key: "data-fd", .. })
        ));
    }

    #[test]
    fn file_and_vfio_take_the_rest_as_a_path_colons_included() {
        assert_eq!(parse("file:-"), Ok(DeviceSpec::File(FileTarget::Stdio)));
        assert_eq!(
            parse("file:/tmp/a:b"),
            Ok(DeviceSpec::File(FileTarget::Path("/tmp/a:b".into())))
        );
        assert_eq!(
            parse("vfio:/sys/bus/pci/devices/0000:01:00.0"),
            Ok(DeviceSpec::Vfio("/sys/bus/pci/devices/0000:01:00.0".into()))
        );
    }

    #[test]
    fn each_kind_of_bad_spec_gets_its_own_error() {
        assert_eq!(parse(""), Err(SpecError::Empty));
        assert_eq!(
            parse("gpu:x"),
            Err(SpecError::UnknownKind { kind: "gpu".into() })
        );
        assert!(matches!(
            parse("file:"),
            Err(SpecError::MissingPath { kind: "file", .. })
        ));
        assert!(matches!(
            parse("vfio:"),
            Err(SpecError::MissingPath { kind: "vfio", .. })
        ));
        assert_eq!(parse("emu:"), Err(SpecError::MissingKey { key: "size" }));
        assert_eq!(parse("emu"), Err(SpecError::MissingKey { key: "size" }));
        assert_eq!(
            parse("emu:size=1M,colour=red"),
            Err(SpecError::UnknownKey {
                key: "colour".into()
            })
        );
        assert_eq!(
            parse("emu:size=1M,size=2M"),
            Err(SpecError::DuplicateKey { key: "size" })
        );
        assert_eq!(
            parse("emu:size"),
            Err(SpecError::MissingValue { key: "size".into() })
        );
        assert_eq!(
            parse("emu:size="),
            Err(SpecError::MissingValue { key: "size".into() })
        );
        assert_eq!(parse("emu:size=1M,"), Err(SpecError::EmptyParam));
        assert_eq!(parse("emu:size=0"), Err(SpecError::ZeroSize));
        assert!(matches!(
            parse("emu:size=100T"),
            Err(SpecError::TooLarge { .. })
        ));
        assert_eq!(
            parse("emu:size=1000"),
            Err(SpecError::UnalignedSize { size: 1000 })
        );
        assert!(matches!(
            parse("emu:size=1M,precopy=on"),
            Err(SpecError::BadSize { key: "precopy", .. })
        ));
        assert!(matches!(
            parse("emu:size=12Q"),
            Err(SpecError::BadSize { key: "size", .. })
        ));
        assert!(matches!(
            parse("emu:size=1M,seed=x"),
            Err(SpecError::BadNumber { key: "seed", .. })
        ));
        assert!(matches!(
            parse("emu:size=1M,profile=jpeg"),
            Err(SpecError::BadChoice { key: "profile", .. })
        ));
        assert!(matches!(
            parse("emu:size=1M,p2p=yes"),
            Err(SpecError::BadChoice { key: "p2p", .. })
        ));
        assert!(matches!(
            parse("emu:size=1M,dirty-rate=fast"),
            Err(SpecError::BadSize {
                key: "dirty-rate",
                ..
            })
        ));
    }

    #[test]
    fn error_messages_name_the_offending_key_or_value() {
        let msg = parse("emu:size=1M,colour=red").unwrap_err().to_string();
        assert!(msg.contains("colour"), "{msg}");
        let msg = parse("emu:size=12Q").unwrap_err().to_string();
        assert!(msg.contains("12Q") && msg.contains("size"), "{msg}");
    }

    fn emu_strategy() -> impl Strategy<Value = EmuSpec> {
        (
            1u64..(1 << 28),
            proptest::option::of(any::<u64>()),
            0usize..4,
            prop_oneof![
                Just(Precopy::Whole),
                Just(Precopy::Off),
                (0u64..(1 << 40)).prop_map(Precopy::Initial)
            ],
            proptest::option::of(0u64..(1 << 40)),
            any::<bool>(),
            any::<bool>(),
            proptest::option::of(0u64..(1 << 40)),
            proptest::option::of(0u64..(1 << 40)),
            proptest::option::of(0u64..(1 << 40)),
            any::<bool>(),
        )
            .prop_map(
                |(
                    pages,
                    seed,
                    p,
                    precopy,
                    dirty_rate,
                    p2p,
                    precopy_info_v2,
                    reinit_after,
                    read_error_at,
                    slow,
                    mem,
                )| {
                    EmuSpec {
                        size: pages * 4096,
                        seed,
                        profile: Profile::ALL[p],
                        // data-fd=mem is STOP_COPY-only and has no read-error-at.
                        precopy: if mem { Precopy::Off } else { precopy },
                        dirty_rate,
                        p2p,
                        precopy_info_v2,
                        reinit_after,
                        read_error_at: read_error_at.filter(|_| !mem),
                        slow,
                        refuse_resume: false,
                        data_fd: if mem {
                            DataFdBackend::Mem
                        } else {
                            DataFdBackend::Fuse
                        },
                    }
                },
            )
    }

    proptest! {
        #[test]
        fn canonical_form_parses_back_to_the_same_spec(e in emu_strategy()) {
            let spec = DeviceSpec::Emu(e);
            prop_assert_eq!(parse(&spec.to_string()), Ok(spec));
        }

        #[test]
        fn key_order_does_not_matter(e in emu_strategy()) {
            let spec = DeviceSpec::Emu(e);
            let text = spec.to_string();
            let params: Vec<&str> = text.trim_start_matches("emu:").split(',').rev().collect();
            prop_assert_eq!(parse(&format!("emu:{}", params.join(","))), Ok(spec));
        }

        #[test]
        fn parser_never_panics_on_any_input(s in "(emu|file|vfio)?:?[a-z0-9=,.:/-]{0,40}") {
            let _ = parse(&s);
        }

        #[test]
        fn any_path_round_trips_for_file_specs(p in "/[a-zA-Z0-9_./: -]{1,40}") {
            let spec = DeviceSpec::File(FileTarget::Path(p.clone().into()));
            prop_assert_eq!(parse(&format!("file:{p}")), Ok(spec));
        }
    }
}
