//! Process hardening at worker start: no core dumps (a crash must not write user content to disk), not dumpable
//! (other processes of the same user cannot ptrace it or read its memory), and memory locking where permitted (no
//! page of a job reaches swap).

use std::fmt;

/// What [`harden_process`] achieved; printed at startup so an operator sees what is and is not in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HardeningReport {
    /// `prctl(PR_SET_DUMPABLE, 0)` succeeded: no core dump, no ptrace attach or /proc/<pid>/mem by the same user.
    pub not_dumpable: bool,
    /// RLIMIT_CORE set to 0.
    pub no_core_files: bool,
    pub memory_lock: MemoryLock,
}

/// How memory is kept out of swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryLock {
    /// `mlockall` of current and future pages (locked when first touched).
    AllPages,
    /// Not permitted for the whole process (needs CAP_IPC_LOCK or an unlimited RLIMIT_MEMLOCK); secret buffers are
    /// still locked one by one while the limit allows.
    SecretBuffersOnly { reason: String },
    /// Turned off by configuration.
    Off,
}

impl HardeningReport {
    /// Whether every mechanism is in force.
    pub fn complete(&self) -> bool {
        self.not_dumpable && self.no_core_files && self.memory_lock == MemoryLock::AllPages
    }
}

impl fmt::Display for HardeningReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes_no = |b: bool| if b { "yes" } else { "NO" };
        write!(f, "not dumpable: {}, core files off: {}, ", yes_no(self.not_dumpable), yes_no(self.no_core_files))?;
        match &self.memory_lock {
            MemoryLock::AllPages => write!(f, "memory locked: all pages"),
            MemoryLock::SecretBuffersOnly { reason } => write!(f, "memory locked: secret buffers only ({reason})"),
            MemoryLock::Off => write!(f, "memory locked: off (configured)"),
        }
    }
}

/// Hardens the current process. Never fails: each refused step is reported instead, because a worker that cannot
/// lock memory can still serve non-private jobs and the operator decides.
pub fn harden_process(lock_memory: bool) -> HardeningReport {
    // SAFETY: prctl and setrlimit with these arguments only change this process's own attributes.
    let not_dumpable = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } == 0;
    let no_core = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: as above; `no_core` is a valid rlimit.
    let no_core_files = unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) } == 0;
    let memory_lock = if !lock_memory {
        MemoryLock::Off
    } else if let Some(reason) = lock_refusal() {
        MemoryLock::SecretBuffersOnly { reason }
    } else {
        // MCL_ONFAULT: mapped model files are locked page by page as they are read, not all at once.
        // SAFETY: mlockall only changes this process's paging.
        match unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) } {
            0 => MemoryLock::AllPages,
            _ => MemoryLock::SecretBuffersOnly { reason: format!("mlockall: {}", std::io::Error::last_os_error()) },
        }
    };
    HardeningReport { not_dumpable, no_core_files, memory_lock }
}

/// Why locking every page would be unsafe here, if it would. With MCL_FUTURE and a finite RLIMIT_MEMLOCK, an
/// allocation past the limit fails (and the process aborts), so it is only done when the limit cannot bite.
fn lock_refusal() -> Option<String> {
    if has_ipc_lock_capability() {
        return None;
    }
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into `limit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Some(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    if limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(format!(
        "RLIMIT_MEMLOCK is {} KiB and CAP_IPC_LOCK is missing; grant the capability or LimitMEMLOCK=infinity",
        limit.rlim_cur / 1024
    ))
}

fn has_ipc_lock_capability() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Whether this process is currently not dumpable (checked, not remembered).
pub fn is_not_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE has no side effects.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_what_is_missing() {
        let report = HardeningReport {
            not_dumpable: true,
            no_core_files: true,
            memory_lock: MemoryLock::SecretBuffersOnly { reason: "RLIMIT_MEMLOCK is 8192 KiB".into() },
        };
        assert!(!report.complete());
        assert_eq!(
            report.to_string(),
            "not dumpable: yes, core files off: yes, memory locked: secret buffers only (RLIMIT_MEMLOCK is 8192 KiB)"
        );
    }
}
