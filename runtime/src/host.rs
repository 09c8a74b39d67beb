//! The host's memory, asked before an allocation sized by an input (an arena, a data set):
//! an allocation that cannot fit is an error saying what needs how much, not the OOM killer.

use crate::backend::RuntimeError;

/// Bytes the kernel says can be allocated without swapping (`MemAvailable` of /proc/meminfo);
/// `None` where it does not say.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// An error if `bytes` for `what` exceed the host's available memory.
pub fn check_fits(bytes: u64, what: &str) -> Result<(), RuntimeError> {
    match available_memory() {
        Some(available) if bytes > available => Err(RuntimeError::HostMemory {
            what: what.to_string(),
            needs: bytes,
            available,
        }),
        _ => Ok(()),
    }
}
