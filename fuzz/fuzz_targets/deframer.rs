//! Deframer and frame decoder: arbitrary bytes, fed in fuzzer-chosen chunks, must never panic;
//! every frame returned must verify and, if it is a control kind, decode or fail typed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfmig_wire::{Control, Deframer, FrameHeader, HEADER_LEN, MAX_PAYLOAD};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    // The first byte picks the chunk size and the session payload limit.
    let chunk = usize::from(split % 64) + 1;
    let limit = if split & 0x80 != 0 { 4096 } else { MAX_PAYLOAD };
    let mut d = Deframer::new(limit);
    let mut frames = Vec::new();
    let mut failed = false;
    for c in rest.chunks(chunk) {
        if d.feed_all(c, |f| frames.push(f)).is_err() {
            failed = true;
            break;
        }
    }
    let _ = d.finish();
    for f in &frames {
        assert!(f.payload.len() == f.header.wire_len as usize);
        assert!(f.header.wire_len <= limit);
        let _ = Control::try_from(f);
    }
    if !failed {
        assert_eq!(d.frames(), frames.len() as u64);
    }
    // The split header/payload path of the io_uring receiver.
    if let Some(hdr) = rest.get(..HEADER_LEN) {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(hdr);
        if let Ok(header) = FrameHeader::decode(&h) {
            let payload = rest.get(HEADER_LEN..).unwrap_or(&[]);
            let n = payload.len().min(header.wire_len as usize);
            let _ = header.verify(&h, &payload[..n]);
        }
    }
});
