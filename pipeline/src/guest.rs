//! Guest memory the devices DMA into, as the pipeline needs it for device DMA dirty tracking:
//! the source reads the pages a device dirtied (`VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`) and ships
//! them as `DirtyPages` frames; the destination writes them into its guest memory.

use vfmig_vfio::IovaRange;

pub use vfmig_vfio::GuestMemoryAccess;

/// Guest page size of `DirtyPages` frames and of the logging the pipeline asks for.
pub const GUEST_PAGE: u64 = 4096;

/// A run of contiguous guest pages: first IOVA and number of 4 KiB pages.
pub(crate) type Run = (u64, u64);

/// Appends the runs of dirty 4 KiB pages a DMA logging bitmap of `range` reports (bit i covers
/// `page_size` bytes at `range.iova + i * page_size`).
pub(crate) fn bitmap_runs(range: IovaRange, page_size: u64, bitmap: &[u64], out: &mut Vec<Run>) {
    let per_bit = (page_size / GUEST_PAGE).max(1);
    let bits = range.length.div_ceil(page_size.max(1));
    let total = range.length / GUEST_PAGE;
    for (w, &word) in bitmap.iter().enumerate() {
        let mut rest = word;
        while rest != 0 {
            let bit = w as u64 * 64 + u64::from(rest.trailing_zeros());
            rest &= rest - 1;
            if bit >= bits {
                continue;
            }
            let first = bit * per_bit;
            let n = per_bit.min(total.saturating_sub(first));
            if n > 0 {
                out.push((range.iova + first * GUEST_PAGE, n));
            }
        }
    }
}

/// Sorts runs and merges overlapping or adjacent ones (several devices may report a page).
pub(crate) fn merge_runs(mut runs: Vec<Run>) -> Vec<Run> {
    runs.sort_unstable();
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    for (start, n) in runs {
        match out.last_mut() {
            Some((s, m)) if start <= *s + *m * GUEST_PAGE => {
                let end = (start + n * GUEST_PAGE).max(*s + *m * GUEST_PAGE);
                *m = (end - *s) / GUEST_PAGE;
            }
            _ => out.push((start, n)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_bits_become_runs_within_the_range_and_runs_merge() {
        let r = IovaRange {
            iova: 0x10000,
            length: 70 * GUEST_PAGE,
        };
        let mut out = Vec::new();
        bitmap_runs(r, GUEST_PAGE, &[0b101, 1 << 5 | 1 << 63], &mut out);
        assert_eq!(out, [(0x10000, 1), (0x12000, 1), (0x10000 + 69 * 4096, 1)]);
        let mut big = Vec::new();
        bitmap_runs(r, 4 * GUEST_PAGE, &[1 << 17], &mut big);
        assert_eq!(
            big,
            [(0x10000 + 68 * 4096, 2)],
            "clipped at the end of the range"
        );
        out.push((0x11000, 2));
        assert_eq!(merge_runs(out), [(0x10000, 3), (0x10000 + 69 * 4096, 1)]);
    }
}
