//! A criterion measurement of the process's CPU time (`CLOCK_PROCESS_CPUTIME_ID`)
//! instead of wall-clock time. The benchmarks run on small machines shared with builds
//! and tests: wall-clock time there counts every moment another process held the CPU,
//! CPU time does not (cache and memory-bandwidth contention still show). For a
//! single-threaded benchmark it equals wall-clock time on an idle machine; for one
//! that uses several threads (wasmtime's parallel compilation in `Plugin::load`) it is
//! the CPU spent by all of them, not the latency.

use criterion::measurement::{Measurement, ValueFormatter, WallTime};

#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

const CLOCK_PROCESS_CPUTIME_ID: i32 = 2;

extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

fn now_ns() -> u64 {
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // Linux (glibc, musl) on a 64-bit target: `struct timespec` is two i64s, and this
    // clock always exists.
    let rc = unsafe { clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_PROCESS_CPUTIME_ID) failed");
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Process CPU time in nanoseconds, shown and analysed like wall-clock time.
pub struct CpuTime;

impl Measurement for CpuTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        now_ns()
    }
    fn end(&self, i: u64) -> u64 {
        now_ns().saturating_sub(i)
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        // Values are nanoseconds, as WallTime's are: its formatter prints them.
        WallTime.formatter()
    }
}
