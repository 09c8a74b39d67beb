//! fisherc's code generator.
//!
//! ```text
//! optimised Graph ──lower──▶ kernels + launches ──plan──▶ Program (schedule, memory plan)
//!        ──ptx::module──▶ PTX text          ──exec──▶ CPU execution of the same kernels
//! ```
//!
//! * [`kir`]: the kernel IR; [`builder`]: a typed way to write it.
//! * [`ptx`]: rendering to PTX; [`exec`]: running it on the CPU, thread by thread.

pub mod builder;
pub mod compile;
pub mod device;
pub mod exec;
pub mod kir;
pub mod lower;
pub mod plan;
pub mod ptx;
pub mod ptxas;
