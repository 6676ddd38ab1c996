//! Device DMA dirty logging arguments (`VFIO_DEVICE_FEATURE_DMA_LOGGING_*`) and their validation,
//! shared by every [`crate::MigrationDevice`] so the same bad input gets the same typed error.

/// One IOVA range to track (`struct vfio_device_feature_dma_logging_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IovaRange {
    /// Start IOVA; must be aligned to the logging page size.
    pub iova: u64,
    /// Length in bytes; non-zero and aligned to the logging page size.
    pub length: u64,
}

impl IovaRange {
    /// One past the last byte, or `None` if the range wraps the address space.
    pub fn end(&self) -> Option<u64> {
        self.iova.checked_add(self.length)
    }
}

/// The most ranges a START accepts: as many `{iova, length}` pairs as fit in one 4 KiB page,
/// the kernel's minimum guarantee (256). More gives E2BIG.
pub const MAX_LOGGING_RANGES: usize = 4096 / 16;

/// Smallest logging page size (`VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` needs >= 4 KiB).
pub const MIN_LOGGING_PAGE_SIZE: u64 = 4096;

/// What was wrong with a DMA logging request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaLoggingError {
    /// No ranges given.
    #[error("DMA_LOGGING_START with no ranges")]
    NoRanges,
    /// More ranges than the device accepts (E2BIG).
    #[error("DMA_LOGGING_START with {count} ranges; at most {max} are accepted")]
    TooManyRanges {
        /// Ranges given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The page size is not a power of two of at least 4 KiB.
    #[error("DMA logging page size {page_size:#x} is not a power of two >= 4 KiB")]
    BadPageSize {
        /// The page size given.
        page_size: u64,
    },
    /// A range is empty, wraps, or is not aligned to the page size.
    #[error("DMA logging range {index} (iova {iova:#x}, length {length:#x}) is empty, wraps or is not aligned to page size {page_size:#x}")]
    Unaligned {
        /// Index in the list.
        index: usize,
        /// Range start.
        iova: u64,
        /// Range length.
        length: u64,
        /// The page size it must be aligned to.
        page_size: u64,
    },
    /// Two ranges overlap.
    #[error("DMA logging ranges {first} and {second} overlap")]
    Overlap {
        /// Index of one range.
        first: usize,
        /// Index of the other.
        second: usize,
    },
    /// START while logging is already on (one START until STOP).
    #[error("DMA logging is already started")]
    AlreadyStarted,
    /// REPORT or STOP while logging is off.
    #[error("DMA logging is not started")]
    NotStarted,
    /// REPORT for a span not inside one tracked range.
    #[error(
        "DMA logging report for iova {iova:#x} length {length:#x} is outside the tracked ranges"
    )]
    NotTracked {
        /// Span start.
        iova: u64,
        /// Span length.
        length: u64,
    },
    /// REPORT with a bitmap too small for the span.
    #[error("DMA logging report bitmap holds {have_bits} pages, the span needs {need_bits}")]
    BitmapTooSmall {
        /// Pages the bitmap can hold.
        have_bits: u64,
        /// Pages in the span.
        need_bits: u64,
    },
}

/// Checks a page size for START or REPORT.
pub fn validate_page_size(page_size: u64) -> Result<(), DmaLoggingError> {
    if page_size < MIN_LOGGING_PAGE_SIZE || !page_size.is_power_of_two() {
        return Err(DmaLoggingError::BadPageSize { page_size });
    }
    Ok(())
}

/// Checks a START range list: count, page size, alignment, wrap and overlap. O(n log n).
pub fn validate_ranges(ranges: &[IovaRange], page_size: u64) -> Result<(), DmaLoggingError> {
    if ranges.is_empty() {
        return Err(DmaLoggingError::NoRanges);
    }
    if ranges.len() > MAX_LOGGING_RANGES {
        return Err(DmaLoggingError::TooManyRanges {
            count: ranges.len(),
            max: MAX_LOGGING_RANGES,
        });
    }
    validate_page_size(page_size)?;
    let mask = page_size - 1;
    for (index, r) in ranges.iter().enumerate() {
        if r.length == 0 || r.iova & mask != 0 || r.length & mask != 0 || r.end().is_none() {
            return Err(DmaLoggingError::Unaligned {
                index,
                iova: r.iova,
                length: r.length,
                page_size,
            });
        }
    }
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_unstable_by_key(|&i| ranges[i].iova);
    for w in order.windows(2) {
        let (a, b) = (ranges[w[0]], ranges[w[1]]);
        // `end()` cannot be None here: checked above.
        if a.end().is_some_and(|end| end > b.iova) {
            return Err(DmaLoggingError::Overlap {
                first: w[0].min(w[1]),
                second: w[0].max(w[1]),
            });
        }
    }
    Ok(())
}

/// Pages in `length` bytes at `page_size` (rounded up).
pub fn pages(length: u64, page_size: u64) -> u64 {
    length.div_ceil(page_size)
}

/// Checks a REPORT request against the tracked ranges and the bitmap size (in u64 words).
pub fn validate_report(
    tracked: &[IovaRange],
    iova: u64,
    length: u64,
    page_size: u64,
    bitmap_words: usize,
) -> Result<(), DmaLoggingError> {
    validate_page_size(page_size)?;
    let end = iova
        .checked_add(length)
        .ok_or(DmaLoggingError::NotTracked { iova, length })?;
    if length == 0
        || !tracked
            .iter()
            .any(|r| r.iova <= iova && r.end().is_some_and(|e| end <= e))
    {
        return Err(DmaLoggingError::NotTracked { iova, length });
    }
    let need_bits = pages(length, page_size);
    let have_bits = (bitmap_words as u64).saturating_mul(64);
    if have_bits < need_bits {
        return Err(DmaLoggingError::BitmapTooSmall {
            have_bits,
            need_bits,
        });
    }
    Ok(())
}
