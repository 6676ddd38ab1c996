//! `include/vfmig.h` is what cbindgen makes of this crate today: a change to the API that was not
//! followed by regenerating the header fails here (and so in CI).
//!
//! To regenerate: `VFMIG_BLESS_HEADER=1 cargo test -p vfmig-capi --test header`.

use std::path::Path;

#[test]
fn checked_in_header_matches_what_cbindgen_generates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = cbindgen::Config::from_file(dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let bindings = cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    let mut generated = Vec::new();
    bindings.write(&mut generated);
    let generated = String::from_utf8(generated).expect("UTF-8 header");
    let path = dir.join("include/vfmig.h");
    if std::env::var_os("VFMIG_BLESS_HEADER").is_some() {
        std::fs::write(&path, &generated).expect("write include/vfmig.h");
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    if checked_in != generated {
        // A change of a struct or a signature also needs VFMIG_ABI_VERSION bumped (ffi.rs).
        let line = checked_in
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .map_or_else(|| "the end".to_owned(), |i| format!("line {}", i + 1));
        panic!(
            "capi/include/vfmig.h is out of date (first difference at {line}); regenerate it with \
             VFMIG_BLESS_HEADER=1 cargo test -p vfmig-capi --test header, and commit it"
        );
    }
}
