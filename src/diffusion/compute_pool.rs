//! Where CPU model calls run: on a thread of the compute pool (rayon's global pool), not on the caller's thread.
//!
//! Every parallel CPU tensor operation (candle's, `gemm`'s, ours) hands its pieces to the pool. Started from a thread
//! outside the pool, each such operation wakes a pool thread and puts the caller to sleep until it is done: two
//! context switches per operation, hundreds of operations per UNet call. For small models that cost more than the
//! arithmetic (a miniature's VAE decode took twice as long). Started from a pool thread, an operation runs on that
//! thread and the others only join in to take pieces, so a whole model call pays for one hand-over.

use candle_core::Device;

/// Runs `work` on a compute-pool thread and waits for it; inline when already on one, or when `device` is not the
/// CPU (GPU kernels do not use the pool, and a GPU context is bound to the thread that uses it).
///
/// `work` must not block on anything a pool thread may hold: while it waits for its own pieces, a pool thread can
/// pick up another caller's `work`.
pub fn on_compute_pool<R: Send>(device: &Device, work: impl FnOnce() -> R + Send) -> R {
    if !device.is_cpu() || rayon::current_thread_index().is_some() {
        work()
    } else {
        // `scope` runs its body on a pool thread when called from outside the pool.
        rayon::scope(|_| work())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_work_runs_on_a_pool_thread_and_nested_work_stays_there() {
        let caller = std::thread::current().id();
        assert_eq!(rayon::current_thread_index(), None, "the test harness thread is not a pool thread");
        let (outer, inner) = on_compute_pool(&Device::Cpu, || {
            let outer = (std::thread::current().id(), rayon::current_thread_index());
            let inner = on_compute_pool(&Device::Cpu, || (std::thread::current().id(), rayon::current_thread_index()));
            (outer, inner)
        });
        assert_ne!(outer.0, caller);
        assert!(outer.1.is_some(), "ran on a pool thread");
        assert_eq!(inner, outer, "work started on a pool thread runs there");
    }

    #[test]
    fn the_result_and_borrowed_state_come_back() {
        let mut seen = Vec::new();
        let sum = on_compute_pool(&Device::Cpu, || {
            seen.push(1);
            seen.iter().sum::<i32>() + 41
        });
        assert_eq!((sum, seen), (42, vec![1]));
    }
}
