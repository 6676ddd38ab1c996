//! Content of the state files: the deterministic generator ([`Rng`]), the content profiles
//! ([`Profile`]), the shared-library pages of the `mixed` profile ([`LibCorpus`]) and the file
//! writer ([`write_state`]).

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::{LOOP_CHUNK, PAGE};

/// splitmix64: a small deterministic generator for page content and page order.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Fills `buf` (a multiple of 8 bytes long) with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
    }

    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Content of a state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    /// Incompressible.
    Random,
    /// Per group of 4 pages, in a random order: 2 zero, 1 shared-library bytes, 1 random.
    Mixed,
    /// 97% zero pages, 3% random ones (each page random with probability 3/100).
    Zero,
}

impl Profile {
    /// Parses `random`, `mixed`, `zero`.
    pub fn from_name(s: &str) -> Option<Profile> {
        match s {
            "random" => Some(Profile::Random),
            "mixed" => Some(Profile::Mixed),
            "zero" => Some(Profile::Zero),
            _ => None,
        }
    }

    /// The name [`Profile::from_name`] reads.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Random => "random",
            Profile::Mixed => "mixed",
            Profile::Zero => "zero",
        }
    }
}

/// Shared-library bytes for the `mixed` profile: the regular `*.so*` files of the system's
/// library directory, in name order, up to a cap; pages are taken from it in turn.
#[derive(Debug)]
pub struct LibCorpus {
    pub(super) bytes: Vec<u8>,
}

impl LibCorpus {
    /// Reads up to `cap` bytes (whole pages) of libraries from the first of the usual library
    /// directories that has any.
    pub fn load(cap: usize) -> io::Result<LibCorpus> {
        let arch = std::env::consts::ARCH;
        let dirs = [
            format!("/usr/lib/{arch}-linux-gnu"),
            "/usr/lib64".to_owned(),
            "/usr/lib".to_owned(),
            "/lib64".to_owned(),
        ];
        for d in &dirs {
            let Ok(rd) = fs::read_dir(d) else { continue };
            let mut files: Vec<PathBuf> = rd
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().contains(".so"))
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.path())
                .collect();
            files.sort();
            let mut bytes = Vec::new();
            for f in files {
                if bytes.len() >= cap {
                    break;
                }
                let Ok(mut file) = File::open(&f) else {
                    continue;
                };
                let want = u64::try_from(cap - bytes.len()).unwrap_or(u64::MAX);
                let _ = (&mut file).take(want).read_to_end(&mut bytes);
            }
            bytes.truncate(bytes.len() / PAGE * PAGE);
            if !bytes.is_empty() {
                return Ok(LibCorpus { bytes });
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no shared libraries (*.so*) found in {dirs:?} for the mixed profile"),
        ))
    }

    /// Page `i` of the corpus (cycling).
    fn page(&self, i: u64) -> &[u8] {
        let pages = (self.bytes.len() / PAGE).max(1) as u64;
        let at = usize::try_from(i % pages).unwrap_or(0) * PAGE;
        &self.bytes[at..at + PAGE]
    }
}

/// Writes `size` bytes (rounded up to whole pages) of `profile` content to `path`.
pub fn write_state(path: &Path, size: u64, profile: Profile, libs: &LibCorpus) -> io::Result<()> {
    let mut f = io::BufWriter::with_capacity(LOOP_CHUNK, File::create(path)?);
    let pages = size.div_ceil(PAGE as u64);
    let mut rng = Rng::new(0x7f4a_7c15 ^ size ^ (profile as u64) << 56);
    let mut page = vec![0u8; PAGE];
    let zero = vec![0u8; PAGE];
    let mut lib_next = 0u64;
    // Page kinds of the current group (mixed: 0 zero, 1 library, 2 random).
    let mut group = [0u8; 4];
    for i in 0..pages {
        let kind = match profile {
            Profile::Random => 2,
            Profile::Zero => {
                if rng.below(100) < 3 {
                    2
                } else {
                    0
                }
            }
            Profile::Mixed => {
                let slot = usize::try_from(i % 4).unwrap_or(0);
                if slot == 0 {
                    group = [0, 0, 1, 2];
                    // Fisher-Yates: exactly 50/25/25 per group, in a random order.
                    for j in (1..4).rev() {
                        let k = usize::try_from(rng.below(j as u64 + 1)).unwrap_or(0);
                        group.swap(j, k);
                    }
                }
                group[slot]
            }
        };
        match kind {
            0 => f.write_all(&zero)?,
            1 => {
                f.write_all(libs.page(lib_next))?;
                lib_next += 1;
            }
            _ => {
                rng.fill(&mut page);
                f.write_all(&page)?;
            }
        }
    }
    f.flush()?;
    f.into_inner().map_err(|e| e.into_error())?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_profile_is_half_zero_pages_and_deterministic() {
        let dir = std::env::temp_dir().join(format!("vfmig-cli-e2e-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let libs = LibCorpus {
            bytes: (0..2 * PAGE)
                .map(|i| u8::try_from(i % 251).unwrap_or(0) | 1)
                .collect(),
        };
        let (a, b) = (dir.join("a"), dir.join("b"));
        write_state(&a, 256 * PAGE as u64, Profile::Mixed, &libs).expect("write");
        write_state(&b, 256 * PAGE as u64, Profile::Mixed, &libs).expect("write");
        let da = fs::read(&a).expect("read");
        assert_eq!(da, fs::read(&b).expect("read"), "same content every time");
        assert_eq!(da.len(), 256 * PAGE);
        let zero = da
            .chunks(PAGE)
            .filter(|p| p.iter().all(|&x| x == 0))
            .count();
        assert_eq!(zero, 128, "exactly half the pages are zero");
        let lib = da
            .chunks(PAGE)
            .filter(|p| *p == &libs.bytes[..PAGE] || *p == &libs.bytes[PAGE..])
            .count();
        assert_eq!(lib, 64, "a quarter are library pages");
        let _ = fs::remove_dir_all(&dir);
    }
}
