//! Private Mode: every mechanism that keeps a private job's content (prompt, input image, mask, embeddings,
//! latents, output) out of everything but locked, wiped memory, in one place. The other modules call in here; this
//! module calls none of them.
//!
//! | Guarantee | Mechanism | Proof |
//! |---|---|---|
//! | No byte of a private job stays readable in the worker's memory after its result is out | [`ZeroOnFree`] global allocator (every freed block zeroed, so copies made inside libraries die with their buffers); [`SecretBytes`]/[`SecretString`] for the content the worker holds; [`wipe_tensors`] for tensors still held; [`wipe_matmul_scratch`] for gemm's per-thread packing slab; the job's message zeroed in the NATS client's read buffer (`queue::worker`); the tokenizer built without its word cache | `tests/private_mode.rs`: canaries (prompt, image file and base64, decoded pixels, mask, output) searched in `/proc/<pid>/mem` of the real worker: found while the job runs (the scan can fail), 0 after the result |
//! | The content never reaches swap or a core dump | [`harden_process`]: `PR_SET_DUMPABLE 0`, `RLIMIT_CORE 0`, `mlockall` when permitted; secret buffers are `mlock`ed and `MADV_DONTDUMP` | unit tests in `secret.rs` (`dd` flag in smaps), `tests/private_mode.rs` (core limit 0, startup report) |
//! | Nothing of it is written to disk, logs, caches, metadata, dead letters or the object store in plaintext | the engine's private path (`engine::private_jobs`: no embedding cache, no PNG text); the worker stores no unsealed output (images only to `reply`, a content-free record in the results stream), no training sample, a dead letter without content; `tracing` fields never carry content | `tests/private_mode.rs` (no file opened or created, `write_bytes` unchanged, 0 canaries in trace-level logs, a non-private job keeps its metadata); `tests/sealed_jobs.rs`; `tests/logging.rs` |
//! | The queue and the object store hold only ciphertext of a sealed job | [`seal`]: HPKE (RFC 9180, X25519 + HKDF-SHA256 + ChaCha20-Poly1305) to the fleet's key; each output sealed to the client's one-time key; AAD binds both to the job id | `seal` unit tests; `tests/sealed_jobs.rs` (no canary in any stream, message or file of the server, with positive controls) |
//! | On CUDA, a private job's device memory is zeroed before another job can get it | [`PrivateDeviceScope`] (`device.rs`, `gpu.rs`): the job allocates from a pool of its own, swept with zeros at the end; its own cuBLAS workspace; the job has the device to itself | `sweep.rs` unit tests; `scripts/device-private-check.sh` (`examples/gpu_residue.rs`) on a real GPU |
//!
//! What it does not cover (stated in the README as well): copies in kernel socket buffers and the NATS server,
//! the GPU driver's own state, and an attacker with root on the worker host.

mod alloc;
mod device;
#[cfg(feature = "cuda")]
mod gpu;
mod harden;
pub mod seal;
mod secret;
#[cfg(any(test, feature = "cuda"))]
mod sweep;
mod wipe;

pub use alloc::ZeroOnFree;
pub use device::{DeviceWipeReport, PrivateDeviceError, PrivateDeviceScope};
#[cfg(feature = "cuda")]
pub use gpu::device_pool_reserved_bytes;
pub use harden::{harden_process, is_not_dumpable, HardeningReport, MemoryLock};
pub use secret::{wipe_vec, SecretBytes, SecretString};
pub use wipe::{wipe_bytes, wipe_matmul_scratch, wipe_tensor, wipe_tensors};
