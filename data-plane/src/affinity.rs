//! Pinning worker threads to CPUs (`portico-dp --cpu-affinity`), as nginx's
//! `worker_cpu_affinity auto` and HAProxy's `cpu-map auto` do.
//!
//! Off by default. Worth it where the proxy shares a few cores with other
//! busy processes: left to the scheduler, two workers sometimes queue on
//! one CPU while the other runs something else, and the requests of the
//! waiting worker stall for a scheduler tick (see BENCHMARKS.md, the
//! unpinned HTTP/1.1 layout). Pinned, each worker keeps a CPU of its own.

use std::io;

/// The CPUs this process may run on (its affinity mask, which taskset,
/// cpusets and container limits narrow), in ascending order.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    imp::allowed_cpus()
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    imp::pin_current_thread(cpu)
}

/// The CPU for each of `workers` workers: the allowed CPUs in turn, round
/// again when there are more workers than CPUs. Empty when `cpus` is.
pub fn plan(cpus: &[usize], workers: usize) -> Vec<usize> {
    if cpus.is_empty() {
        return Vec::new();
    }
    (0..workers).map(|i| cpus[i % cpus.len()]).collect()
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::mem::{size_of, zeroed};

    pub fn allowed_cpus() -> io::Result<Vec<usize>> {
        // SAFETY: `cpu_set_t` is a plain bit array; all zeroes is the empty
        // set, and the pointer and size passed describe exactly `set`.
        let set = unsafe {
            let mut set: libc::cpu_set_t = zeroed();
            if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return Err(io::Error::last_os_error());
            }
            set
        };
        Ok((0..libc::CPU_SETSIZE as usize)
            // SAFETY: `cpu` is below CPU_SETSIZE, inside the set.
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
            .collect())
    }

    pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is beyond the largest CPU set"),
            ));
        }
        // SAFETY: as above; `cpu` was checked against CPU_SETSIZE.
        unsafe {
            let mut set: libc::cpu_set_t = zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(())
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use std::io;

    fn unsupported() -> io::Error {
        io::Error::new(
            io::ErrorKind::Unsupported,
            "CPU affinity is only supported on Linux",
        )
    }

    pub fn allowed_cpus() -> io::Result<Vec<usize>> {
        Err(unsupported())
    }

    pub fn pin_current_thread(_cpu: usize) -> io::Result<()> {
        Err(unsupported())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_take_the_allowed_cpus_in_turn() {
        assert_eq!(plan(&[2, 5], 3), vec![2, 5, 2]);
        assert_eq!(plan(&[0, 1, 2, 3], 2), vec![0, 1]);
        assert!(plan(&[], 2).is_empty());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_pinned_thread_runs_only_on_its_cpu() {
        let cpus = allowed_cpus().expect("affinity");
        assert!(!cpus.is_empty());
        let last = *cpus.last().unwrap();
        // A thread of its own: pinning the test's thread would narrow
        // every later test on it.
        std::thread::spawn(move || {
            pin_current_thread(last).expect("pin");
            assert_eq!(allowed_cpus().expect("affinity"), vec![last]);
        })
        .join()
        .unwrap();
        let err = pin_current_thread(usize::MAX).expect_err("out of range");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}
