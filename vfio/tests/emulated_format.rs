//! Property tests of the emulated device's stream parser: any split of a valid stream is
//! accepted with the source's digest; any damage is refused; nothing panics.

use std::fs::File;
use std::io::Read;
use std::sync::OnceLock;

use proptest::prelude::*;
use vfmig_vfio::emulated::format::{Parser, HEADER_LEN};
use vfmig_vfio::emulated::{EmulatedConfig, EmulatedDevice, Profile};
use vfmig_vfio::{DeviceState, MigrationDevice};

const SIZE: u64 = 256 << 10;
const BLOCK: u64 = 16 << 10;

/// One valid stream and its digest, read once through a real data fd.
fn stream() -> &'static (Vec<u8>, [u8; 32]) {
    static S: OnceLock<(Vec<u8>, [u8; 32])> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = EmulatedConfig::new("prop", SIZE, 3)
            .with_block_size(BLOCK)
            .with_profile(Profile::Mixed);
        let mut dev = EmulatedDevice::new(cfg).unwrap();
        let mut f = File::from(dev.set_state(DeviceState::StopCopy).unwrap().unwrap());
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        dev.set_state(DeviceState::Stop).unwrap();
        (data, dev.state_digest().unwrap())
    })
}

fn feed_split(data: &[u8], cuts: &[usize]) -> Parser {
    let mut p = Parser::new(SIZE, BLOCK);
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
    points.sort_unstable();
    let mut at = 0;
    for c in points.into_iter().chain([data.len()]) {
        assert_eq!(p.feed(&data[at..c]), c - at);
        at = c;
    }
    p
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_split_of_a_valid_stream_is_accepted(cuts in prop::collection::vec(any::<usize>(), 0..40)) {
        let (data, digest) = stream();
        let p = feed_split(data, &cuts);
        prop_assert_eq!(p.finish().ok(), Some(*digest));
    }

    #[test]
    fn any_flipped_byte_is_refused(at in any::<usize>(), bit in 0u8..8, cuts in prop::collection::vec(any::<usize>(), 0..8)) {
        let (data, _) = stream();
        let mut bad = data.clone();
        let at = at % bad.len();
        bad[at] ^= 1 << bit;
        let p = feed_split(&bad, &cuts);
        prop_assert!(p.finish().is_err(), "flip at {} accepted", at);
    }

    #[test]
    fn any_truncation_is_refused(cut in any::<usize>()) {
        let (data, _) = stream();
        let cut = cut % data.len();
        let p = feed_split(&data[..cut], &[]);
        prop_assert!(p.finish().is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(junk in prop::collection::vec(any::<u8>(), 0..4096)) {
        let mut p = Parser::new(SIZE, BLOCK);
        p.feed(&junk);
        prop_assert!(p.finish().is_err());
    }

    #[test]
    fn a_valid_header_with_a_huge_length_is_refused(len in any::<u32>()) {
        // Re-encode the first BLOCK header with another length: the header hash no longer
        // matches, and even a matching hash could not make a block of the wrong length fit.
        let (data, _) = stream();
        let mut bad = data[..HEADER_LEN * 4].to_vec();
        bad[HEADER_LEN + 24 + 24..HEADER_LEN + 24 + 28].copy_from_slice(&len.to_le_bytes());
        let mut p = Parser::new(SIZE, BLOCK);
        p.feed(&bad);
        prop_assert!(p.finish().is_err());
    }
}
