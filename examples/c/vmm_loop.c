/*
 * A VMM's migration loop in C over vfmig's C API (capi/include/vfmig.h): both hosts in one
 * process, over loopback, with two emulated devices on each side.
 *
 * The source VMM streams its devices in pre-copy while its (fake) vCPUs run, polls
 * vfmig_source_status() like QEMU's `info migrate`, and switches over itself once every
 * device's initial data is out, the destination acknowledged it (switchover-ack) and the
 * estimated stop-copy time fits its budget: it pauses its vCPUs first, then calls
 * vfmig_source_switchover(). The destination VMM receives, waits for the commit, "loads its
 * RAM", resumes the devices, then its vCPUs, and reports the outcome, which the source reports
 * in turn. The vCPU pause flag is checked against the device states at every step, and the
 * devices' state digests are compared at the end.
 *
 * Build and run (from the repository root):
 *   cargo build --release -p vfmig-capi && make -C examples/c && examples/c/vmm_loop
 * Exit status 0 and a last line "vmm_loop: OK" on success.
 */
#define _POSIX_C_SOURCE 200809L

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "vfmig.h"

#define NDEV 2

/* The same size and seed on both sides; the source's devices keep dirtying state while they
 * run. */
static const char *const SPECS[NDEV] = {
    "name=gpu0,size=8M,seed=1,dirty-rate=2M",
    "name=nic0,size=8M,seed=2,dirty-rate=2M",
};

/* Longest pre-copy this VMM allows before switching over anyway. */
#define MAX_PRECOPY_US (5u * 1000u * 1000u)
/* Longest the whole source loop may take before the example gives up. */
#define GIVE_UP_US (120ull * 1000u * 1000u)

static void fail(const char *what, VfmigCode code) {
    fprintf(stderr, "vmm_loop: %s failed with code %d: %s\n", what, (int)code, vfmig_last_error());
    exit(1);
}

#define CHECK(call)                         \
    do {                                    \
        VfmigCode code_ = (call);           \
        if (code_ != VFMIG_CODE_OK)         \
            fail(#call, code_);             \
    } while (0)

#define EXPECT(cond)                                                        \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "vmm_loop: %s:%d: expected %s\n", __FILE__,     \
                    __LINE__, #cond);                                       \
            exit(1);                                                        \
        }                                                                   \
    } while (0)

static int is_running(VfmigDeviceState s) {
    return s == VFMIG_DEVICE_STATE_RUNNING || s == VFMIG_DEVICE_STATE_RUNNING_P2P ||
           s == VFMIG_DEVICE_STATE_PRE_COPY || s == VFMIG_DEVICE_STATE_PRE_COPY_P2P;
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

/* The guest's vCPUs on one host, as far as migration cares. */
struct vcpus {
    atomic_bool paused;
};

/* The VMM's invariant: running vCPUs need running devices. */
static void check_source(struct vcpus *v, VfmigSource *s) {
    for (size_t i = 0; i < NDEV; i++) {
        VfmigDeviceState st;
        CHECK(vfmig_source_device_state(s, i, &st));
        if (!atomic_load(&v->paused) && !is_running(st)) {
            fprintf(stderr, "vmm_loop: source device %zu is in state %d while the vCPUs run\n",
                    i, (int)st);
            exit(1);
        }
    }
}

struct destination_host {
    VfmigListener *listener;
    uint8_t digests[NDEV][32];
    VfmigReport report;
};

static void *destination_main(void *arg) {
    struct destination_host *h = arg;
    struct vcpus vcpus;
    atomic_init(&vcpus.paused, true); /* they run only after the commit */

    VfmigDevice *devices[NDEV];
    for (size_t i = 0; i < NDEV; i++)
        CHECK(vfmig_device_emulated(SPECS[i], VFMIG_SIDE_DESTINATION, &devices[i]));
    VfmigDestinationOptions opts;
    CHECK(vfmig_destination_options_default(&opts));
    VfmigDestination *d;
    /* The session takes the devices over (and sets our entries to NULL). */
    CHECK(vfmig_destination_new(&opts, devices, NDEV, &d));
    EXPECT(devices[0] == NULL && devices[1] == NULL);

    /* Blocks until the source committed: the source's devices never run again. */
    CHECK(vfmig_destination_receive(d, h->listener));
    /* ... the VMM loads its RAM here ... then the devices, then the vCPUs. */
    CHECK(vfmig_destination_resume(d));
    atomic_store(&vcpus.paused, false);
    for (size_t i = 0; i < NDEV; i++) {
        VfmigDeviceState st;
        CHECK(vfmig_destination_device_state(d, i, &st));
        EXPECT(st == VFMIG_DEVICE_STATE_RUNNING);
    }
    VfmigDeviceReport devs[NDEV];
    CHECK(vfmig_destination_finish(d, VFMIG_OUTCOME_RESUMED, &h->report, devs, NDEV));
    for (size_t i = 0; i < NDEV; i++)
        CHECK(vfmig_destination_device_digest(d, i, h->digests[i]));
    fprintf(stderr, "destination: %llu bytes loaded, outcome %d\n",
            (unsigned long long)h->report.raw_bytes, (int)h->report.outcome);
    vfmig_destination_free(d);
    return NULL;
}

/* Errors come back as codes with a message, never as a crash. */
static void show_error_handling(void) {
    VfmigDevice *dev = NULL;
    VfmigCode c = vfmig_device_emulated("size=lots", VFMIG_SIDE_SOURCE, &dev);
    EXPECT(c == VFMIG_CODE_INVALID_ARGUMENT && dev == NULL);
    EXPECT(strstr(vfmig_last_error(), "size") != NULL);
    EXPECT(vfmig_source_switchover(NULL) == VFMIG_CODE_NULL_POINTER);
    EXPECT(vfmig_device_emulated("size=1M", 7, &dev) == VFMIG_CODE_INVALID_ARGUMENT);
}

int main(void) {
    /* A library built from another header would lay its structs out differently. */
    EXPECT(vfmig_abi_version() == VFMIG_ABI_VERSION);
    fprintf(stderr, "vfmig %s\n", vfmig_version());
    show_error_handling();

    /* Destination host: listens on a free loopback port. */
    struct destination_host host;
    memset(&host, 0, sizeof host);
    CHECK(vfmig_listener_bind("127.0.0.1:0", &host.listener));
    uint16_t port;
    CHECK(vfmig_listener_port(host.listener, &port));
    pthread_t dst;
    EXPECT(pthread_create(&dst, NULL, destination_main, &host) == 0);

    /* Source host. */
    struct vcpus vcpus;
    atomic_init(&vcpus.paused, false);
    VfmigDevice *devices[NDEV];
    for (size_t i = 0; i < NDEV; i++)
        CHECK(vfmig_device_emulated(SPECS[i], VFMIG_SIDE_SOURCE, &devices[i]));
    VfmigSourceOptions opts;
    CHECK(vfmig_source_options_default(&opts));
    opts.max_downtime_ms = 100;
    VfmigSource *s;
    CHECK(vfmig_source_new(&opts, devices, NDEV, &s));
    EXPECT(vfmig_source_switchover(s) == VFMIG_CODE_WRONG_STEP); /* not started */

    char address[32];
    snprintf(address, sizeof address, "127.0.0.1:%u", (unsigned)port);
    CHECK(vfmig_source_start(s, address));

    VfmigStatus st;
    VfmigDeviceStatus ds[NDEV];
    for (unsigned poll = 0;; poll++) {
        CHECK(vfmig_source_status(s, &st, ds, NDEV));
        EXPECT(st.device_count == NDEV);
        check_source(&vcpus, s);
        int initial_out = 1;
        uint64_t raw = 0;
        for (size_t i = 0; i < NDEV; i++) {
            initial_out &= ds[i].initial_bytes == 0;
            raw += ds[i].raw_bytes;
        }
        if (poll % 10 == 0)
            fprintf(stderr,
                    "source: phase %d, %9llu bytes, rate %6.0f MB/s, acked %d, "
                    "downtime estimate %s%llu us\n",
                    (int)st.phase, (unsigned long long)raw, st.rate_bps / 1e6,
                    st.switchover_acked, st.has_estimated_downtime ? "" : "(none) ",
                    (unsigned long long)st.estimated_downtime_us);
        int fits = st.has_estimated_downtime &&
                   st.estimated_downtime_us <= opts.max_downtime_ms * 1000u;
        if (initial_out && st.switchover_acked &&
            (fits || st.switchover_due || st.precopy_elapsed_us > MAX_PRECOPY_US))
            break;
        EXPECT(st.elapsed_us < GIVE_UP_US);
        sleep_ms(20);
    }

    /* pause-before-switchover: the vCPUs stop first, then the devices. */
    atomic_store(&vcpus.paused, true);
    CHECK(vfmig_source_switchover(s));
    check_source(&vcpus, s);
    CHECK(vfmig_source_status(s, &st, NULL, 0));
    EXPECT(st.phase == VFMIG_PHASE_STOP_COPY);

    VfmigReport report;
    VfmigDeviceReport dr[NDEV];
    CHECK(vfmig_source_finish(s, &report, dr, NDEV));
    EXPECT(report.outcome == VFMIG_OUTCOME_RESUMED);
    EXPECT(report.device_count == NDEV);
    EXPECT(vfmig_source_finish(s, &report, dr, NDEV) == VFMIG_CODE_WRONG_STEP);
    for (size_t i = 0; i < NDEV; i++) {
        VfmigDeviceState ds_;
        CHECK(vfmig_source_device_state(s, i, &ds_));
        EXPECT(ds_ == VFMIG_DEVICE_STATE_STOP); /* the source never runs again */
        EXPECT(dr[i].final_state == VFMIG_DEVICE_STATE_STOP);
        EXPECT(dr[i].raw_bytes > 0);
    }
    fprintf(stderr,
            "source: %llu bytes (%llu + %llu in pre-copy), downtime %llu us (budget exceeded: "
            "%d), codec %s, destination outcome %d\n",
            (unsigned long long)report.raw_bytes, (unsigned long long)dr[0].precopy_bytes,
            (unsigned long long)dr[1].precopy_bytes, (unsigned long long)report.downtime_us,
            report.max_downtime_exceeded, report.codec, (int)report.outcome);

    EXPECT(pthread_join(dst, NULL) == 0);
    EXPECT(host.report.outcome == VFMIG_OUTCOME_RESUMED);
    for (size_t i = 0; i < NDEV; i++) {
        uint8_t digest[32];
        CHECK(vfmig_source_device_digest(s, i, digest));
        if (memcmp(digest, host.digests[i], sizeof digest) != 0) {
            fprintf(stderr, "vmm_loop: device %s: the destination's state differs\n", dr[i].name);
            return 1;
        }
    }
    vfmig_source_free(s);
    vfmig_listener_free(host.listener);
    printf("vmm_loop: OK: %d devices, %llu bytes, outcome resumed, states identical\n", NDEV,
           (unsigned long long)report.raw_bytes);
    return 0;
}
