//! fisherc's code generator.
//!
//! ```text
//! optimised Graph ──lower──▶ kernels + launches ──plan──▶ Program (schedule, memory plan)
//!        ──ptx::module──▶ PTX text          ──exec──▶ CPU execution of the same kernels
//!        ──artifact──▶ module.ptx + plan.json (what the runtime loads)
//! ```
//!
//! * [`kir`]: the kernel IR; [`builder`]: a typed way to write it; [`mma`]: tensor-core
//!   instructions as data (shape, fragment layouts).
//! * [`lower`]: every op of the optimised graph as kernels; [`plan`]: schedule and memory
//!   plan; [`compile`]: the two after the optimizer.
//! * [`ptx`]: rendering to PTX; [`ptxas`]: assembling it; [`exec`] and [`device`]: running
//!   the kernels on the CPU, thread by thread.
//! * [`artifact`]: a compiled step on disk; [`finite`]: the kernel that counts a buffer's
//!   non-finite values, for the trainer's check of the state on the device.

pub mod artifact;
pub mod builder;
pub mod compile;
pub mod device;
pub mod exec;
pub mod finite;
pub mod kir;
pub mod lower;
pub mod magic;
pub mod mma;
pub mod options;
pub mod plan;
pub mod ptx;
pub mod ptxas;
