//! The C API's contract, exercised through the exported functions as a C caller would: NULL
//! pointers and bad values give codes with messages, the caller's fds stay the caller's, devices
//! are consumed, steps out of order change nothing, and abort and cancel roll the devices back.

// This file plays a C caller: a block of calls on one object shares one safety argument.
#![allow(clippy::multiple_unsafe_ops_per_block)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::os::fd::AsRawFd;
use std::ptr::null_mut;

use vfmig::*;

fn last_error() -> String {
    // SAFETY: vfmig_last_error never returns NULL and the string lives until the next call on
    // this thread; it is copied at once.
    unsafe { CStr::from_ptr(vfmig_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn c(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

fn emulated(spec: &str, side: VfmigSide) -> *mut VfmigDevice {
    let spec = c(spec);
    let mut dev = null_mut();
    // SAFETY: a NUL-terminated spec and a valid out-pointer.
    let code = unsafe { vfmig_device_emulated(spec.as_ptr(), side as u32, &mut dev) };
    assert_eq!(code, VfmigCode::Ok, "{}", last_error());
    dev
}

fn source(specs: &[&str], opts: Option<&VfmigSourceOptions>) -> *mut VfmigSource {
    let mut devs: Vec<_> = specs
        .iter()
        .map(|s| emulated(s, VfmigSide::Source))
        .collect();
    let mut s = null_mut();
    let opts = opts.map_or(std::ptr::null(), |o| o as *const _);
    // SAFETY: devs holds devs.len() fresh devices; opts is NULL or a valid struct.
    let code = unsafe { vfmig_source_new(opts, devs.as_mut_ptr(), devs.len(), &mut s) };
    assert_eq!(code, VfmigCode::Ok, "{}", last_error());
    assert!(devs.iter().all(|d| d.is_null()), "the entries are cleared");
    s
}

fn source_state(s: *mut VfmigSource, i: usize) -> VfmigDeviceState {
    let mut st = VfmigDeviceState::Unknown;
    // SAFETY: a live session used by this thread only, and a valid out-pointer.
    let code = unsafe { vfmig_source_device_state(s, i, &mut st) };
    assert_eq!(code, VfmigCode::Ok, "{}", last_error());
    st
}

#[test]
fn null_pointers_are_refused_with_a_code_and_a_message() {
    let mut dev = null_mut();
    // SAFETY: NULL is what is being tested; the out-pointer is valid.
    let code = unsafe { vfmig_device_emulated(std::ptr::null(), 0, &mut dev) };
    assert_eq!(code, VfmigCode::NullPointer);
    assert_eq!(last_error(), "argument spec is NULL");
    let spec = c("size=1M");
    // SAFETY: NULL out-pointer is what is being tested.
    let code = unsafe { vfmig_device_emulated(spec.as_ptr(), 0, null_mut()) };
    assert_eq!(code, VfmigCode::NullPointer);
    // SAFETY: NULL sessions are what is being tested.
    unsafe {
        assert_eq!(vfmig_source_switchover(null_mut()), VfmigCode::NullPointer);
        assert_eq!(
            vfmig_source_status(null_mut(), null_mut(), null_mut(), 0),
            VfmigCode::NullPointer
        );
        assert_eq!(vfmig_destination_resume(null_mut()), VfmigCode::NullPointer);
        assert_eq!(vfmig_cancel(std::ptr::null()), VfmigCode::NullPointer);
        vfmig_source_free(null_mut());
        vfmig_device_free(null_mut());
    }
    // A success clears the message.
    let mut o = std::mem::MaybeUninit::<VfmigSourceOptions>::uninit();
    // SAFETY: a valid out-pointer.
    let code = unsafe { vfmig_source_options_default(o.as_mut_ptr()) };
    assert_eq!(code, VfmigCode::Ok);
    assert_eq!(last_error(), "");
}

#[test]
fn bad_values_are_invalid_arguments_never_undefined() {
    let spec = c("size=1M");
    let mut dev = null_mut();
    // SAFETY: valid pointers; 7 is not a VfmigSide.
    let code = unsafe { vfmig_device_emulated(spec.as_ptr(), 7, &mut dev) };
    assert_eq!(code, VfmigCode::InvalidArgument);
    assert!(dev.is_null());
    let bad = c("size=1M,colour=red");
    // SAFETY: valid pointers.
    let code = unsafe { vfmig_device_emulated(bad.as_ptr(), 0, &mut dev) };
    assert_eq!(code, VfmigCode::InvalidArgument);
    assert!(last_error().contains("colour"), "{}", last_error());
    let not_utf8 = [0xffu8, 0];
    // SAFETY: a NUL-terminated byte string.
    let code = unsafe { vfmig_device_emulated(not_utf8.as_ptr().cast::<c_char>(), 0, &mut dev) };
    assert_eq!(code, VfmigCode::InvalidArgument);
    let mut l = null_mut();
    let addr = c("not an address");
    // SAFETY: valid pointers.
    let code = unsafe { vfmig_listener_bind(addr.as_ptr(), &mut l) };
    assert_eq!(code, VfmigCode::InvalidArgument);
    assert!(l.is_null());
}

#[test]
fn a_non_vfio_fd_is_refused_and_stays_the_callers() {
    let file = std::fs::File::open("/dev/null").expect("/dev/null");
    let name = c("not-vfio");
    let mut dev = null_mut();
    // SAFETY: a valid fd, name and out-pointer.
    let code = unsafe { vfmig_device_vfio_from_fd(file.as_raw_fd(), name.as_ptr(), &mut dev) };
    assert_eq!(code, VfmigCode::Device, "{}", last_error());
    assert!(dev.is_null());
    // The library worked on a duplicate: the caller's fd is still open.
    // SAFETY: F_GETFD on an integer fd only reads its flags.
    assert!(unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFD) } >= 0);
    // SAFETY: valid pointers; -1 is what is being tested.
    let code = unsafe { vfmig_device_vfio_from_fd(-1, name.as_ptr(), &mut dev) };
    assert_eq!(code, VfmigCode::InvalidArgument);
    // A descriptor that is not open: refused, not used.
    // SAFETY: valid pointers; the fd number is far above any this test opens.
    let code = unsafe { vfmig_device_stream_from_fd(1 << 20, name.as_ptr(), 0, &mut dev) };
    assert_eq!(code, VfmigCode::InvalidArgument);
    assert!(
        last_error().contains("cannot duplicate"),
        "{}",
        last_error()
    );
}

#[test]
fn steps_out_of_order_are_refused_and_change_nothing() {
    let s = source(&["name=a,size=1M"], None);
    // SAFETY: a live session used by this thread only.
    unsafe {
        assert_eq!(vfmig_source_switchover(s), VfmigCode::WrongStep);
        assert_eq!(
            vfmig_source_finish(s, null_mut(), null_mut(), 0),
            VfmigCode::WrongStep
        );
        let mut st = std::mem::MaybeUninit::<VfmigStatus>::uninit();
        assert_eq!(
            vfmig_source_status(s, st.as_mut_ptr(), null_mut(), 0),
            VfmigCode::WrongStep
        );
        let mut active = true;
        assert_eq!(vfmig_source_abort(s, &mut active), VfmigCode::Ok);
        assert!(!active);
    }
    assert_eq!(source_state(s, 0), VfmigDeviceState::Running);
    let mut st = VfmigDeviceState::Unknown;
    // SAFETY: a live session; index 5 is out of range.
    let code = unsafe { vfmig_source_device_state(s, 5, &mut st) };
    assert_eq!(code, VfmigCode::InvalidArgument);
    // SAFETY: frees the session once.
    unsafe { vfmig_source_free(s) };

    let mut devs = [emulated("size=1M", VfmigSide::Destination)];
    let mut d = null_mut();
    // SAFETY: one fresh device, defaults, a valid out-pointer.
    unsafe {
        assert_eq!(
            vfmig_destination_new(std::ptr::null(), devs.as_mut_ptr(), 1, &mut d),
            VfmigCode::Ok
        );
        assert_eq!(vfmig_destination_resume(d), VfmigCode::WrongStep);
        assert_eq!(
            vfmig_destination_finish(d, VfmigOutcome::Resumed as u32, null_mut(), null_mut(), 0),
            VfmigCode::WrongStep
        );
        assert_eq!(
            vfmig_destination_finish(d, 99, null_mut(), null_mut(), 0),
            VfmigCode::InvalidArgument
        );
        vfmig_destination_free(d);
    }
}

#[test]
fn a_null_entry_consumes_the_others_and_fails() {
    let mut devs = [emulated("size=1M", VfmigSide::Source), null_mut()];
    let mut s = null_mut();
    // SAFETY: two entries, one device and one NULL.
    let code = unsafe { vfmig_source_new(std::ptr::null(), devs.as_mut_ptr(), 2, &mut s) };
    assert_eq!(code, VfmigCode::NullPointer);
    assert!(s.is_null());
    assert!(devs[0].is_null(), "consumed whatever the result");
}

/// Binds a loopback listener, then on a thread makes a destination session over `devices`
/// (addresses of fresh devices, handed over once) and plays the destination VMM with `vmm`;
/// frees the session and the listener afterwards.
fn on_destination<T: Send + 'static>(
    devices: Vec<usize>,
    vmm: impl FnOnce(*mut VfmigDestination, *mut VfmigListener) -> T + Send + 'static,
) -> (u16, std::thread::JoinHandle<T>) {
    let addr = c("127.0.0.1:0");
    let mut l = null_mut();
    let mut port = 0;
    // SAFETY: valid pointers; the listener is handed to the thread and freed there.
    unsafe {
        assert_eq!(vfmig_listener_bind(addr.as_ptr(), &mut l), VfmigCode::Ok);
        assert_eq!(vfmig_listener_port(l, &mut port), VfmigCode::Ok);
    }
    let l = l as usize;
    let h = std::thread::spawn(move || {
        let l = l as *mut VfmigListener;
        let mut devs: Vec<_> = devices.into_iter().map(|d| d as *mut VfmigDevice).collect();
        let mut d = null_mut();
        // SAFETY: fresh devices handed over once, defaults, a valid out-pointer.
        let code = unsafe {
            vfmig_destination_new(std::ptr::null(), devs.as_mut_ptr(), devs.len(), &mut d)
        };
        assert_eq!(code, VfmigCode::Ok, "{}", last_error());
        let out = vmm(d, l);
        // SAFETY: each freed once, after the VMM is done with them.
        unsafe {
            vfmig_destination_free(d);
            vfmig_listener_free(l);
        }
        out
    });
    (port, h)
}

fn destination_devices(specs: &[&str]) -> Vec<usize> {
    specs
        .iter()
        .map(|s| emulated(s, VfmigSide::Destination) as usize)
        .collect()
}

fn ok(code: VfmigCode) {
    assert_eq!(code, VfmigCode::Ok, "{}", last_error());
}

/// A destination that receives and returns the receive code and its device states afterwards.
fn destination_thread(
    specs: &'static [&'static str],
) -> (
    u16,
    std::thread::JoinHandle<(VfmigCode, Vec<VfmigDeviceState>)>,
) {
    on_destination(destination_devices(specs), move |d, l| {
        // SAFETY: a live session and listener used by this thread only.
        let code = unsafe { vfmig_destination_receive(d, l) };
        let states = (0..specs.len())
            .map(|i| {
                let mut st = VfmigDeviceState::Unknown;
                // SAFETY: a live session and a valid out-pointer.
                ok(unsafe { vfmig_destination_device_state(d, i, &mut st) });
                st
            })
            .collect();
        (code, states)
    })
}

fn start(s: *mut VfmigSource, port: u16) {
    let addr = c(&format!("127.0.0.1:{port}"));
    // SAFETY: a live session and a NUL-terminated address.
    let code = unsafe { vfmig_source_start(s, addr.as_ptr()) };
    assert_eq!(code, VfmigCode::Ok, "{}", last_error());
}

fn status(s: *mut VfmigSource) -> (VfmigCode, Option<VfmigStatus>) {
    let mut st = std::mem::MaybeUninit::<VfmigStatus>::uninit();
    let mut devs = std::mem::MaybeUninit::<[VfmigDeviceStatus; 2]>::uninit();
    // SAFETY: a live session, one writable status and two writable device entries.
    let code = unsafe { vfmig_source_status(s, st.as_mut_ptr(), devs.as_mut_ptr().cast(), 2) };
    // SAFETY: written in full when the call succeeded.
    (
        code,
        (code == VfmigCode::Ok).then(|| unsafe { st.assume_init() }),
    )
}

const TWO: &[&str] = &[
    "name=gpu0,size=4M,seed=1,dirty-rate=1M",
    "name=nic0,size=4M,seed=2,dirty-rate=1M",
];

#[test]
fn abort_in_precopy_rolls_both_sides_back() {
    let (port, dst) = destination_thread(TWO);
    let s = source(TWO, None);
    start(s, port);
    let (code, st) = status(s);
    assert_eq!(code, VfmigCode::Ok, "{}", last_error());
    assert_eq!(st.expect("status").device_count, 2);
    let mut active = false;
    // SAFETY: a live session used by this thread only.
    assert_eq!(unsafe { vfmig_source_abort(s, &mut active) }, VfmigCode::Ok);
    assert!(active);
    assert_eq!(source_state(s, 0), VfmigDeviceState::Running);
    assert_eq!(source_state(s, 1), VfmigDeviceState::Running);
    let (code, states) = dst.join().expect("destination thread");
    assert_ne!(code, VfmigCode::Ok);
    assert_ne!(code, VfmigCode::InDoubt);
    assert!(
        states.iter().all(|s| *s == VfmigDeviceState::Running),
        "destination devices reset: {states:?}"
    );
    // SAFETY: frees the session once.
    unsafe { vfmig_source_free(s) };
}

#[test]
fn cancel_from_another_thread_fails_the_next_step_and_rolls_back() {
    let (port, dst) = destination_thread(TWO);
    let s = source(TWO, None);
    let mut cancel = null_mut();
    // SAFETY: a live session and a valid out-pointer.
    let code = unsafe { vfmig_source_cancel_handle(s, &mut cancel) };
    assert_eq!(code, VfmigCode::Ok);
    start(s, port);
    let cancel = cancel as usize;
    std::thread::spawn(move || {
        // SAFETY: a live handle, freed after this call only.
        unsafe { vfmig_cancel(cancel as *const VfmigCancel) }
    })
    .join()
    .expect("cancel thread");
    let (code, _) = status(s);
    assert_eq!(code, VfmigCode::Cancelled, "{}", last_error());
    assert!(last_error().contains("cancelled"), "{}", last_error());
    assert_eq!(source_state(s, 0), VfmigDeviceState::Running);
    let (code, _) = dst.join().expect("destination thread");
    assert_ne!(code, VfmigCode::Ok);
    // SAFETY: each object freed once; the handle outlives nothing it needs.
    unsafe {
        vfmig_source_free(s);
        vfmig_cancel_free(cancel as *mut VfmigCancel);
    }
}

fn stream(file: &std::fs::File, name: &str, side: VfmigSide) -> *mut VfmigDevice {
    let name = c(name);
    let mut dev = null_mut();
    // SAFETY: an open fd, a NUL-terminated name and a valid out-pointer.
    let code = unsafe {
        vfmig_device_stream_from_fd(file.as_raw_fd(), name.as_ptr(), side as u32, &mut dev)
    };
    assert_eq!(code, VfmigCode::Ok, "{}", last_error());
    dev
}

#[test]
fn a_stream_and_an_emulated_device_migrate_together_and_arrive_intact() {
    use std::io::{Read, Seek, Write};

    // 3 MiB + a tail that is not a multiple of any chunk size, of varied bytes.
    let payload: Vec<u8> = (0..(3u32 << 20) + 12_345)
        .map(|i: u32| i.wrapping_mul(2_654_435_761).to_le_bytes()[2])
        .collect();
    let mut src_file = tempfile::tempfile().expect("temp file");
    src_file.write_all(&payload).expect("write");
    src_file.rewind().expect("rewind");
    let mut dst_file = tempfile::tempfile().expect("temp file");

    let devices = vec![
        emulated("name=emu,size=2M,seed=9", VfmigSide::Destination) as usize,
        stream(&dst_file, "vmstate", VfmigSide::Destination) as usize,
    ];
    let (port, dst) = on_destination(devices, |d, l| {
        let mut report = std::mem::MaybeUninit::<VfmigReport>::uninit();
        let mut digest = [0u8; 32];
        // SAFETY: a live session and listener used by this thread only, valid out-pointers.
        unsafe {
            ok(vfmig_destination_receive(d, l));
            ok(vfmig_destination_resume(d));
            let resumed = VfmigOutcome::Resumed as u32;
            ok(vfmig_destination_finish(
                d,
                resumed,
                report.as_mut_ptr(),
                null_mut(),
                0,
            ));
            ok(vfmig_destination_device_digest(d, 0, digest.as_mut_ptr()));
            // A stream has no digest of its own: its bytes are the proof.
            assert_eq!(
                vfmig_destination_device_digest(d, 1, digest.as_mut_ptr()),
                VfmigCode::Unsupported
            );
            (report.assume_init(), digest)
        }
    });

    let mut devs = [
        emulated("name=emu,size=2M,seed=9,dirty-rate=1M", VfmigSide::Source),
        stream(&src_file, "vmstate", VfmigSide::Source),
    ];
    let mut s = null_mut();
    // SAFETY: two fresh devices, defaults, a valid out-pointer.
    let code = unsafe { vfmig_source_new(std::ptr::null(), devs.as_mut_ptr(), 2, &mut s) };
    assert_eq!(code, VfmigCode::Ok, "{}", last_error());
    start(s, port);
    loop {
        let (code, st) = status(s);
        assert_eq!(code, VfmigCode::Ok, "{}", last_error());
        let st = st.expect("status");
        // The stream has no PRE_COPY, so the session streams everything in STOP_COPY.
        assert_eq!(st.phase, VfmigPhase::Setup);
        if st.switchover_due {
            break;
        }
    }
    let mut report = std::mem::MaybeUninit::<VfmigReport>::uninit();
    let mut dr = std::mem::MaybeUninit::<[VfmigDeviceReport; 2]>::uninit();
    let mut digest = [0u8; 32];
    // SAFETY: a live session used by this thread only; one report and two device entries.
    let (report, dr) = unsafe {
        assert_eq!(
            vfmig_source_switchover(s),
            VfmigCode::Ok,
            "{}",
            last_error()
        );
        let code = vfmig_source_finish(s, report.as_mut_ptr(), dr.as_mut_ptr().cast(), 2);
        assert_eq!(code, VfmigCode::Ok, "{}", last_error());
        assert_eq!(
            vfmig_source_device_digest(s, 0, digest.as_mut_ptr()),
            VfmigCode::Ok
        );
        vfmig_source_free(s);
        (report.assume_init(), dr.assume_init())
    };
    assert_eq!(report.outcome, VfmigOutcome::Resumed);
    assert_eq!(report.device_count, 2);
    assert_eq!(dr[1].raw_bytes, payload.len() as u64);
    let name = CStr::from_bytes_until_nul(
        // SAFETY: c_char and u8 have the same size and alignment.
        unsafe { &*(std::ptr::from_ref(&dr[1].name) as *const [u8; VFMIG_NAME_MAX]) },
    )
    .expect("NUL-terminated");
    assert_eq!(name.to_str(), Ok("vmstate"));

    let (dst_report, dst_digest) = dst.join().expect("destination thread");
    assert_eq!(dst_report.outcome, VfmigOutcome::Resumed);
    assert_eq!(dst_digest, digest, "the emulated device's state arrived");
    let mut arrived = Vec::new();
    dst_file.rewind().expect("rewind");
    dst_file.read_to_end(&mut arrived).expect("read");
    assert!(arrived == payload, "the stream arrived byte for byte");
}

/// Migrates TWO in step mode with the destination VMM reporting `outcome` (after resuming for
/// `Resumed`); returns the source's finish code and its devices' states afterwards.
fn migrate_with_outcome(outcome: VfmigOutcome) -> (VfmigCode, Vec<VfmigDeviceState>) {
    let (port, dst) = on_destination(destination_devices(TWO), move |d, l| {
        let mut report = std::mem::MaybeUninit::<VfmigReport>::uninit();
        let mut st = VfmigDeviceState::Unknown;
        // SAFETY: a live session and listener used by this thread only, valid out-pointers.
        unsafe {
            ok(vfmig_destination_receive(d, l));
            if outcome == VfmigOutcome::Resumed {
                ok(vfmig_destination_resume(d));
            }
            ok(vfmig_destination_finish(
                d,
                outcome as u32,
                report.as_mut_ptr(),
                null_mut(),
                0,
            ));
            ok(vfmig_destination_device_state(d, 0, &mut st));
            (report.assume_init().outcome, st)
        }
    });
    let s = source(TWO, None);
    start(s, port);
    while !status(s).1.expect("status").switchover_due {}
    // SAFETY: a live session used by this thread only.
    let code = unsafe {
        assert_eq!(
            vfmig_source_switchover(s),
            VfmigCode::Ok,
            "{}",
            last_error()
        );
        vfmig_source_finish(s, null_mut(), null_mut(), 0)
    };
    let states = vec![source_state(s, 0), source_state(s, 1)];
    // SAFETY: frees the session once.
    unsafe { vfmig_source_free(s) };
    let (sent, dst_state) = dst.join().expect("destination thread");
    assert_eq!(
        sent, outcome,
        "the destination's report carries what it sent"
    );
    let expected_dst = match outcome {
        VfmigOutcome::Resumed => VfmigDeviceState::Running,
        VfmigOutcome::Held => VfmigDeviceState::Stop,
        // Reset before the source learns it.
        _ => VfmigDeviceState::Running,
    };
    assert_eq!(dst_state, expected_dst);
    (code, states)
}

#[test]
fn a_destination_that_fails_to_resume_makes_the_source_roll_back() {
    let (code, states) = migrate_with_outcome(VfmigOutcome::ResumeFailed);
    assert_eq!(code, VfmigCode::DestinationResumeFailed, "{}", last_error());
    assert!(
        states.iter().all(|s| *s == VfmigDeviceState::Running),
        "the source runs again: {states:?}"
    );
}

#[test]
fn a_destination_that_holds_the_state_leaves_the_source_stopped() {
    let (code, states) = migrate_with_outcome(VfmigOutcome::Held);
    assert_eq!(code, VfmigCode::Ok, "{}", last_error());
    assert!(
        states.iter().all(|s| *s == VfmigDeviceState::Stop),
        "{states:?}"
    );
}

#[test]
fn a_non_blocking_pipe_is_refused_as_a_stream() {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    assert_eq!(rc, 0);
    // SAFETY: both descriptors were just created and are owned here only.
    let (r, w) = unsafe {
        use std::os::fd::FromRawFd;
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    let name = c("pipe");
    let mut dev = null_mut();
    // SAFETY: an open fd, a NUL-terminated name and a valid out-pointer.
    let code = unsafe { vfmig_device_stream_from_fd(r.as_raw_fd(), name.as_ptr(), 0, &mut dev) };
    assert_eq!(code, VfmigCode::InvalidArgument);
    assert!(last_error().contains("O_NONBLOCK"), "{}", last_error());
    assert!(dev.is_null());
    drop(w);
}

/// One report as the callback saw it.
struct SeenReport {
    round: u64,
    last: bool,
    dirty_pages: u64,
    ranges: Vec<(u64, u64)>,
}

/// What the dirty-export callback saw.
#[derive(Default)]
struct Seen {
    started: Vec<(usize, Vec<String>)>,
    reports: Vec<SeenReport>,
}

/// The VMM's callback: records what it is told. No panics here (it is called through the C
/// ABI); the test checks afterwards.
unsafe extern "C" fn record(user: *mut c_void, event: *const VfmigDirtyEvent) {
    // SAFETY: `user` is the &Mutex<Seen> the test passed, alive for the session.
    let seen = unsafe { &*(user as *const std::sync::Mutex<Seen>) };
    // SAFETY: valid for the duration of the call.
    let e = unsafe { &*event };
    let Ok(mut seen) = seen.lock() else { return };
    match e.kind {
        VfmigDirtyKind::Started => {
            // SAFETY: untracked_count names, each NUL-terminated, valid during the call.
            let names = unsafe { std::slice::from_raw_parts(e.untracked_names, e.untracked_count) }
                .iter()
                // SAFETY: as above.
                .map(|n| unsafe { CStr::from_ptr(*n) }.to_string_lossy().into_owned())
                .collect();
            seen.started.push((e.tracked_devices, names));
        }
        VfmigDirtyKind::Report => {
            // SAFETY: bitmap_count bitmaps, each with `words` words, valid during the call.
            let maps = unsafe { std::slice::from_raw_parts(e.bitmaps, e.bitmap_count) };
            let mut pages = 0;
            let mut ranges = Vec::new();
            for m in maps {
                // SAFETY: as above.
                let bits = unsafe { std::slice::from_raw_parts(m.bits, m.words) };
                pages += bits.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
                ranges.push((m.iova, m.length));
            }
            seen.reports.push(SeenReport {
                round: e.round,
                last: e.last,
                dirty_pages: pages,
                ranges,
            });
        }
    }
}

#[test]
fn dirty_bitmaps_reach_the_vmm_callback_ending_with_the_last_harvest() {
    const SRC: &[&str] = &[
        "name=dma-a,size=1M,seed=21,guest=2M@0x40000000,guest-dma=4000,quiesce-dma=8",
        "name=no-dma,size=1M,seed=22",
    ];
    const DST: &[&str] = &["name=dma-a,size=1M,seed=21", "name=no-dma,size=1M,seed=22"];
    let seen = Box::new(std::sync::Mutex::new(Seen::default()));
    let ranges = [VfmigIovaRange {
        iova: 0x4000_0000,
        length: 2 << 20,
    }];
    let mut opts = std::mem::MaybeUninit::<VfmigSourceOptions>::uninit();
    // SAFETY: a valid out-pointer; the struct is then fully initialised.
    let mut opts = unsafe {
        ok(vfmig_source_options_default(opts.as_mut_ptr()));
        opts.assume_init()
    };
    opts.dirty = VfmigDirtyExport {
        callback: Some(record),
        user: std::ptr::from_ref(&*seen) as *mut c_void,
        ranges: ranges.as_ptr(),
        range_count: ranges.len(),
        page_size: 4096,
    };
    let (port, dst) = on_destination(destination_devices(DST), |d, l| {
        // SAFETY: a live session and listener used by this thread only.
        unsafe {
            ok(vfmig_destination_receive(d, l));
            ok(vfmig_destination_resume(d));
            let resumed = VfmigOutcome::Resumed as u32;
            ok(vfmig_destination_finish(
                d,
                resumed,
                null_mut(),
                null_mut(),
                0,
            ));
        }
    });
    let s = source(SRC, Some(&opts));
    start(s, port);
    for _ in 0..20 {
        // Pre-copy while the device DMAs.
        assert_eq!(status(s).0, VfmigCode::Ok, "{}", last_error());
    }
    while !status(s).1.expect("status").switchover_due {}
    // SAFETY: a live session used by this thread only.
    unsafe {
        ok(vfmig_source_switchover(s));
        ok(vfmig_source_finish(s, null_mut(), null_mut(), 0));
        vfmig_source_free(s);
    }
    dst.join().expect("destination thread");

    let seen = seen.lock().expect("lock");
    assert_eq!(seen.started, [(1, vec!["no-dma".to_owned()])]);
    let (last, before) = seen.reports.split_last().expect("at least the last report");
    assert!(last.last, "the final harvest comes last");
    assert!(before.iter().all(|r| !r.last), "exactly one last report");
    assert!(
        last.dirty_pages > 0,
        "the pages written while quiescing are in the last report"
    );
    assert!(seen
        .reports
        .iter()
        .all(|r| r.ranges == [(0x4000_0000, 2 << 20)]));
    let rounds: Vec<u64> = seen.reports.iter().map(|r| r.round).collect();
    assert!(rounds.windows(2).all(|w| w[0] < w[1]), "{rounds:?}");
}

#[test]
fn a_dirty_export_without_ranges_is_refused() {
    let base = VfmigSourceOptions {
        dirty: VfmigDirtyExport {
            callback: Some(record),
            ..VfmigDirtyExport::default()
        },
        ..VfmigSourceOptions::default()
    };
    let ranges = [VfmigIovaRange {
        iova: 0,
        length: 4096,
    }; 300];
    for (ranges, count, code) in [
        (std::ptr::null(), 0, VfmigCode::InvalidArgument),
        (std::ptr::null(), 1, VfmigCode::NullPointer),
        (ranges.as_ptr(), 300, VfmigCode::InvalidArgument),
    ] {
        let opts = VfmigSourceOptions {
            dirty: VfmigDirtyExport {
                ranges,
                range_count: count,
                ..base.dirty
            },
            ..base
        };
        let mut devs = [emulated("size=1M", VfmigSide::Source)];
        let mut s = null_mut();
        // SAFETY: one fresh device, a valid options struct (its ranges NULL or 300 entries).
        let got = unsafe { vfmig_source_new(&opts, devs.as_mut_ptr(), 1, &mut s) };
        assert_eq!(got, code, "{count} ranges: {}", last_error());
        assert!(s.is_null());
    }
}
