//! Deterministic device content: every 4 KiB page is a pure function of
//! `(seed, page index, page version)`, so a device of tens of GiB keeps only per-block versions
//! and digests in memory and regenerates bytes when it streams them.
//!
//! A compressibility [`Profile`] fixes, per page and for the life of the device, whether the page is
//! zero, text-like (structured, compresses well) or random (incompressible).

/// Content page size. Block sizes are multiples of it.
pub const PAGE_SIZE: usize = 4096;

/// The mix of page kinds in the device state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Profile {
    /// Zero, text-like and random pages; about 2.5:1 overall with zstd level 1-3.
    #[default]
    Mixed,
    /// Almost all zero pages (a few random ones).
    Zero,
    /// Incompressible random pages only.
    Random,
    /// Text-like structured pages only.
    Text,
}

impl Profile {
    /// Every profile, in the order of [`Profile::NAMES`].
    pub const ALL: [Profile; 4] = [
        Profile::Mixed,
        Profile::Zero,
        Profile::Random,
        Profile::Text,
    ];

    /// The accepted spellings (the CLI's `profile=` and `--profile`), in order.
    pub const NAMES: &'static [&'static str] = &["mixed", "zero", "random", "text"];

    /// One line for the CLI's help.
    pub const fn description(self) -> &'static str {
        match self {
            Profile::Mixed => "Zero pages, structured and random data (~2.5:1)",
            Profile::Zero => "All zero",
            Profile::Random => "Incompressible",
            Profile::Text => "Highly compressible",
        }
    }

    /// The CLI's spelling (`mixed`, `zero`, `random`, `text`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Profile::Mixed => "mixed",
            Profile::Zero => "zero",
            Profile::Random => "random",
            Profile::Text => "text",
        }
    }

    /// Parses the CLI's spelling.
    pub fn from_name(name: &str) -> Option<Profile> {
        Some(match name {
            "mixed" => Profile::Mixed,
            "zero" => Profile::Zero,
            "random" => Profile::Random,
            "text" => Profile::Text,
            _ => return None,
        })
    }
}

/// What a page holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PageKind {
    Zero,
    Text,
    Random,
}

/// SplitMix64 finaliser: a fast, well-mixed 64-bit hash of a 64-bit value.
#[inline]
pub(crate) const fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A small, fast PRNG (wyrand) for page bytes and the device's own random choices.
#[derive(Clone, Debug)]
pub(crate) struct WyRand(u64);

impl WyRand {
    pub(crate) const fn new(seed: u64) -> WyRand {
        WyRand(seed)
    }

    #[inline]
    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xA076_1D64_78BD_642F);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xE703_7ED1_A0B4_28DB);
        // Folding the 128-bit product: both halves are wanted, truncation is the point.
        #[allow(clippy::cast_possible_truncation)]
        let folded = (t as u64) ^ ((t >> 64) as u64);
        folded
    }

    /// Uniform in `0..n` (n > 0), by multiply-shift.
    #[inline]
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        // The high half of a 64x64 product is < n, so it fits in u64.
        #[allow(clippy::cast_possible_truncation)]
        let v = ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64;
        v
    }
}

/// The kind of page `page` for a device with `seed` and `profile`; fixed for the device's life.
pub(crate) fn page_kind(profile: Profile, seed: u64, page: u64) -> PageKind {
    let roll = mix64(seed ^ mix64(page.wrapping_mul(0x2545_F491_4F6C_DD1D))) % 100;
    match profile {
        Profile::Random => PageKind::Random,
        Profile::Text => PageKind::Text,
        Profile::Zero => {
            if roll < 97 {
                PageKind::Zero
            } else {
                PageKind::Random
            }
        }
        // Measured with zstd level 1 by the `mixed_profile_compresses_about_2_5_to_1` test.
        Profile::Mixed => {
            if roll < 22 {
                PageKind::Zero
            } else if roll < 70 {
                PageKind::Text
            } else {
                PageKind::Random
            }
        }
    }
}

const WORDS: [&[u8]; 32] = [
    b"queue",
    b"doorbell",
    b"head",
    b"tail",
    b"status",
    b"ready",
    b"vector",
    b"msix",
    b"ring",
    b"desc",
    b"len",
    b"flags",
    b"addr",
    b"port",
    b"fifo",
    b"irq",
    b"ok",
    b"busy",
    b"idle",
    b"error",
    b"reset",
    b"link",
    b"up",
    b"down",
    b"rx",
    b"tx",
    b"credit",
    b"window",
    b"ctx",
    b"pasid",
    b"bar0",
    b"mmio",
];

/// Length of one text line.
const LINE: usize = 32;

/// 256 text lines of `LINE` bytes (`word.word=word 00\n`, padded with spaces), built once.
fn text_lines() -> &'static [[u8; LINE]; 256] {
    static LINES: std::sync::OnceLock<[[u8; LINE]; 256]> = std::sync::OnceLock::new();
    LINES.get_or_init(|| {
        let mut lines = [[b' '; LINE]; 256];
        let mut rng = WyRand::new(0x7E57);
        for line in lines.iter_mut() {
            let r = rng.next_u64();
            let mut n = 0;
            for (i, shift) in [0u32, 5, 10].into_iter().enumerate() {
                let w = WORDS[((r >> shift) & 31) as usize];
                let w = &w[..w.len().min(LINE - 6 - n)];
                line[n..n + w.len()].copy_from_slice(w);
                n += w.len();
                line[n] = [b'.', b'=', b' '][i];
                n += 1;
            }
            line[LINE - 1] = b'\n';
        }
        lines
    })
}

/// Fills one text-like page: lines from a fixed table, each with a two-digit counter field.
fn fill_text(rng: &mut WyRand, out: &mut [u8]) {
    let lines = text_lines();
    let mut r = 0u64;
    for (k, chunk) in out.chunks_mut(LINE).enumerate() {
        if k % 4 == 0 {
            r = rng.next_u64();
        }
        let line = &lines[(r & 0xFF) as usize];
        let digits = (r >> 8) & 0xFF;
        r >>= 16;
        let n = chunk.len();
        chunk.copy_from_slice(&line[..n]);
        if n == LINE {
            // Truncation to a digit is the point.
            #[allow(clippy::cast_possible_truncation)]
            {
                chunk[LINE - 3] = b'0' + (digits % 10) as u8;
                chunk[LINE - 4] = b'0' + (digits / 10 % 10) as u8;
            }
        }
    }
}

/// Fills one random page.
fn fill_random(rng: &mut WyRand, out: &mut [u8]) {
    let mut chunks = out.chunks_exact_mut(8);
    for c in &mut chunks {
        c.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let rest = chunks.into_remainder();
    let last = rng.next_u64().to_le_bytes();
    let n = rest.len();
    rest.copy_from_slice(&last[..n]);
}

/// Fills `out` (at most one page) with page `page` at `version`.
pub(crate) fn fill_page(profile: Profile, seed: u64, page: u64, version: u32, out: &mut [u8]) {
    let mut rng = WyRand::new(mix64(seed ^ mix64(page) ^ (u64::from(version) << 40)));
    match page_kind(profile, seed, page) {
        PageKind::Zero => out.fill(0),
        PageKind::Text => fill_text(&mut rng, out),
        PageKind::Random => fill_random(&mut rng, out),
    }
}

/// Fills `out` with the pages starting at byte `offset` (page aligned), all at `version`.
pub(crate) fn fill_range(profile: Profile, seed: u64, offset: u64, version: u32, out: &mut [u8]) {
    let first = offset / PAGE_SIZE as u64;
    for (i, chunk) in out.chunks_mut(PAGE_SIZE).enumerate() {
        fill_page(profile, seed, first + i as u64, version, chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_deterministic_and_versions_differ() {
        let mut a = vec![0u8; PAGE_SIZE];
        let mut b = vec![0u8; PAGE_SIZE];
        for page in 0..64 {
            fill_page(Profile::Mixed, 7, page, 3, &mut a);
            fill_page(Profile::Mixed, 7, page, 3, &mut b);
            assert_eq!(a, b);
            if page_kind(Profile::Mixed, 7, page) != PageKind::Zero {
                fill_page(Profile::Mixed, 7, page, 4, &mut b);
                assert_ne!(
                    a, b,
                    "page {page}: a new version must change a non-zero page"
                );
            }
        }
    }

    #[test]
    fn profiles_have_the_advertised_page_kinds() {
        let count =
            |p: Profile, k: PageKind| (0..1000).filter(|&i| page_kind(p, 1, i) == k).count();
        assert_eq!(count(Profile::Random, PageKind::Random), 1000);
        assert_eq!(count(Profile::Text, PageKind::Text), 1000);
        assert!(count(Profile::Zero, PageKind::Zero) > 900);
        let mixed_zero = count(Profile::Mixed, PageKind::Zero);
        assert!(
            (150..300).contains(&mixed_zero),
            "{mixed_zero} zero pages of 1000"
        );
    }
}
