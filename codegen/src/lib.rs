//! fisherc's code generator.
//!
//! * [`kir`]: the kernel IR; [`builder`]: a typed way to write it.
//! * [`lower`]: every op of the optimised graph as kernels.
//! * [`ptx`]: rendering to PTX; [`ptxas`]: assembling it; [`exec`]: running it on the CPU,
//!   thread by thread.

pub mod builder;
pub mod exec;
pub mod kir;
pub mod lower;
pub mod ptx;
pub mod ptxas;
