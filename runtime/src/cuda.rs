//! The CUDA backend: the artifact's PTX module loaded by the driver, one device arena with the
//! plan's offsets, the step's launches on one stream, optionally captured once into a CUDA
//! graph and replayed.
//!
//! It talks to the driver API through cust's raw bindings (`cust::sys`) where cust has no safe
//! wrapper for what is needed (loading a module with an error log, graph capture, launching
//! with arguments built at run time), and through cust for the context, stream and events.
//! Every failure names what failed: the kernel (with its layer and op), the transfer and
//! buffer, or the driver call.

use std::ffi::{CStr, CString, c_void};
use std::ptr;

use cust::context::Context;
use cust::device::{Device, DeviceAttribute};
use cust::event::{Event, EventFlags};
use cust::stream::{Stream, StreamFlags};
use cust::sys as cu;
use fisherc_codegen::artifact::{Plan, Verified};
use fisherc_codegen::kir::ParamTy;
use fisherc_codegen::plan::{Arg, Buffer, Kind};
use fisherc_codegen::{finite, ptx};

use crate::backend::{Backend, GIB, RuntimeError};

/// Bytes of each JIT log buffer.
const LOG_BYTES: usize = 1 << 16;

pub struct CudaBackend {
    plan: Plan,
    description: String,
    module: cu::CUmodule,
    /// By kernel index of the plan.
    functions: Vec<cu::CUfunction>,
    arena: cu::CUdeviceptr,
    stream: Stream,
    start: Event,
    stop: Event,
    /// The step captured into a CUDA graph, once [`CudaBackend::capture`] has run.
    graph: Option<cu::CUgraphExec>,
    /// The module of [`finite::count_kernel`] and its function.
    finite: (cu::CUmodule, cu::CUfunction),
    /// Device words for the non-finite counts, and how many there are room for.
    counts: (cu::CUdeviceptr, usize),
    // declared last: dropped after everything above that lives in it
    _context: Context,
}

/// The driver's name and description of an error.
fn describe(result: cu::CUresult) -> String {
    let text = |f: unsafe extern "C" fn(
        cu::CUresult,
        *mut *const std::os::raw::c_char,
    ) -> cu::CUresult| {
        let mut s: *const std::os::raw::c_char = ptr::null();
        // SAFETY: the driver writes a pointer to a static string, or leaves null
        let ok = unsafe { f(result, &mut s) } == cu::CUresult::CUDA_SUCCESS && !s.is_null();
        // SAFETY: non-null strings from the driver are NUL-terminated and static
        ok.then(|| unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned())
    };
    match (text(cu::cuGetErrorName), text(cu::cuGetErrorString)) {
        (Some(name), Some(text)) => format!("{name}: {text}"),
        _ => format!("{result:?}"),
    }
}

/// `Ok` for success, else an error saying `what` failed and why.
fn check(result: cu::CUresult, what: impl FnOnce() -> String) -> Result<(), RuntimeError> {
    if result == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(RuntimeError::Device {
            what: what(),
            message: describe(result),
        })
    }
}

fn cust_error(what: &str) -> impl FnOnce(cust::error::CudaError) -> RuntimeError + '_ {
    move |e| RuntimeError::Device {
        what: what.to_string(),
        message: e.to_string(),
    }
}

impl CudaBackend {
    /// Initialises CUDA on device 0, loads the verified artifact's module and allocates its arena
    /// (zeroed, constants written).
    pub fn new(verified: &Verified) -> Result<Self, RuntimeError> {
        let artifact = verified.artifact();
        let context = cust::quick_init().map_err(cust_error("initialising CUDA on device 0"))?;
        let device = Device::get_device(0).map_err(cust_error("opening device 0"))?;
        let name = device
            .name()
            .map_err(cust_error("reading the device name"))?;
        let major = device
            .get_attribute(DeviceAttribute::ComputeCapabilityMajor)
            .map_err(cust_error("reading the compute capability"))?;
        let minor = device
            .get_attribute(DeviceAttribute::ComputeCapabilityMinor)
            .map_err(cust_error("reading the compute capability"))?;
        let plan = artifact.plan.clone();
        let target = plan.source.compile.arch;
        if major * 10 + minor < target.compute_capability() as i32 {
            return Err(RuntimeError::Setup(format!(
                "the artifact targets {target}, and {name} is sm_{major}{minor}: compile with --arch sm_{major}{minor}"
            )));
        }
        let module = load_module(&artifact.ptx)?;
        let finite = load_finite(target.name())?;
        let mut functions = Vec::with_capacity(plan.kernels.len());
        for k in &plan.kernels {
            let cname = CString::new(k.name.as_str()).expect("kernel names have no NUL");
            let mut f: cu::CUfunction = ptr::null_mut();
            // SAFETY: module is loaded; f receives a handle owned by it
            check(
                unsafe { cu::cuModuleGetFunction(&mut f, module, cname.as_ptr()) },
                || format!("finding kernel {} in the module", k.name),
            )?;
            functions.push(f);
        }
        let stream = Stream::new(StreamFlags::NON_BLOCKING, None)
            .map_err(cust_error("creating a stream"))?;
        let event = || Event::new(EventFlags::DEFAULT).map_err(cust_error("creating an event"));
        let (start, stop) = (event()?, event()?);
        let mut arena: cu::CUdeviceptr = 0;
        let bytes = plan.arena_bytes.max(1) as usize;
        check_free_memory(bytes as u64, &name)?;
        // SAFETY: arena receives a fresh allocation of `bytes` bytes, freed in Drop
        check(unsafe { cu::cuMemAlloc_v2(&mut arena, bytes) }, || {
            format!("allocating the {bytes}-byte arena on {name}")
        })?;
        let mut backend = CudaBackend {
            description: format!("{name} (sm_{major}{minor})"),
            plan,
            module,
            functions,
            arena,
            stream,
            start,
            stop,
            graph: None,
            finite,
            counts: (0, 0),
            _context: context,
        };
        backend.clear()?;
        Ok(backend)
    }

    /// Zeroes the arena and writes the constants.
    fn clear(&mut self) -> Result<(), RuntimeError> {
        let bytes = self.plan.arena_bytes as usize;
        // SAFETY: the range lies inside the arena
        check(
            unsafe { cu::cuMemsetD8Async(self.arena, 0, bytes, self.stream.as_inner()) },
            || "zeroing the arena".into(),
        )?;
        let constants: Vec<(Buffer, f32)> = self
            .plan
            .buffers
            .iter()
            .filter_map(|b| match b.kind {
                Kind::Constant(v) => Some((b.clone(), v)),
                _ => None,
            })
            .collect();
        for (buffer, v) in constants {
            self.write(&buffer, &[v.to_bits()])?;
        }
        Ok(())
    }

    fn synchronize(&self, what: impl FnOnce() -> String) -> Result<(), RuntimeError> {
        self.stream.synchronize().map_err(|e| RuntimeError::Device {
            what: what(),
            message: e.to_string(),
        })
    }

    /// Enqueues launch `index` of the plan on the stream.
    fn launch(&self, index: usize) -> Result<(), RuntimeError> {
        let launch = &self.plan.launches[index];
        let kernel = &self.plan.kernels[launch.kernel];
        // every argument in an 8-byte slot; the driver reads each parameter's own size from it
        let mut slots: Vec<u64> = launch
            .args
            .iter()
            .zip(&kernel.params)
            .map(|(arg, (_, ty))| match (arg, ty) {
                (Arg::Buffer(b), ParamTy::Ptr) => self.arena + self.plan.buffers[*b].offset,
                (Arg::U32(v), _) => *v as u64,
                (Arg::F32(v), _) => v.to_bits() as u64,
                (Arg::Buffer(_), _) => unreachable!("plans are checked on reading"),
            })
            .collect();
        let node = &self.plan.nodes[launch.node];
        // SAFETY: the function belongs to the loaded module; the slots are the kernel's
        // parameters, in order (checked when the plan was read)
        let result = unsafe {
            self.enqueue(
                self.functions[launch.kernel],
                (launch.grid, launch.block),
                &mut slots,
            )
        };
        check(result, || {
            format!(
                "launching kernel {} (layer '{}', {})",
                kernel.name, node.layer, node.op
            )
        })
    }

    /// Enqueues `function` on the stream over a `grid` of 1-D blocks of `block` threads, each
    /// argument in an 8-byte slot (the driver reads each parameter's own size from it), with
    /// static shared memory only.
    ///
    /// # Safety
    /// `function` must belong to a module loaded in this context and `slots` hold exactly its
    /// parameters, in order, every pointer among them valid for what the kernel does.
    unsafe fn enqueue(
        &self,
        function: cu::CUfunction,
        (grid, block): ([u32; 2], u32),
        slots: &mut [u64],
    ) -> cu::CUresult {
        let mut params: Vec<*mut c_void> = slots
            .iter_mut()
            .map(|s| s as *mut u64 as *mut c_void)
            .collect();
        // SAFETY: the caller vouches for the function and its slots; params point into them
        // and live through the call, which copies them
        unsafe {
            cu::cuLaunchKernel(
                function,
                grid[0],
                grid[1],
                1,
                block,
                1,
                1,
                0,
                self.stream.as_inner(),
                params.as_mut_ptr(),
                ptr::null_mut(),
            )
        }
    }

    /// Room for `words` non-finite counts on the device.
    fn reserve_counts(&mut self, words: usize) -> Result<(), RuntimeError> {
        if words <= self.counts.1 {
            return Ok(());
        }
        if self.counts.1 > 0 {
            // SAFETY: allocated below by an earlier call; nothing reads it now (every count
            // synchronises)
            unsafe { cu::cuMemFree_v2(self.counts.0) };
            self.counts = (0, 0);
        }
        let mut counts: cu::CUdeviceptr = 0;
        // SAFETY: counts receives a fresh allocation, freed here or in Drop
        check(unsafe { cu::cuMemAlloc_v2(&mut counts, 4 * words) }, || {
            format!("allocating {words} words for non-finite counts")
        })?;
        self.counts = (counts, words);
        Ok(())
    }

    /// Enqueues the counting kernel over `buffer`, its counts into slot `slot`.
    fn launch_count(&self, slot: usize, buffer: &Buffer) -> Result<(), RuntimeError> {
        let words = u32::try_from(buffer.bytes / 4).map_err(|_| {
            RuntimeError::Setup(format!(
                "buffer {} has more than 2^32 words to count",
                buffer.name
            ))
        })?;
        let mut slots: [u64; 3] = [
            self.arena + buffer.offset,
            words as u64,
            self.counts.0 + (4 * slot * finite::COUNTS) as u64,
        ];
        // SAFETY: the function belongs to the loaded counting module; the slots are its
        // parameters (data, words, counts); the buffer lies in the arena and the slot in the
        // reserved counts
        let result = unsafe {
            self.enqueue(
                self.finite.1,
                ([finite::GRID, 1], finite::BLOCK),
                &mut slots,
            )
        };
        check(result, || {
            format!("counting non-finite values of buffer {}", buffer.name)
        })
    }

    /// Captures the whole step into a CUDA graph; [`Backend::run_step`] then replays it with
    /// one launch. Kernel arguments are fixed addresses in the arena, so one capture serves
    /// every step.
    fn capture_graph(&mut self) -> Result<(), RuntimeError> {
        let stream = self.stream.as_inner();
        let mode = cu::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
        // SAFETY: the stream is ours and idle
        check(unsafe { cu::cuStreamBeginCapture_v2(stream, mode) }, || {
            "beginning graph capture".into()
        })?;
        let launched = (0..self.plan.launches.len()).try_for_each(|i| self.launch(i));
        let mut graph: cu::CUgraph = ptr::null_mut();
        // SAFETY: ends the capture begun above, whatever happened in between
        let ended = check(
            unsafe { cu::cuStreamEndCapture(stream, &mut graph) },
            || "ending graph capture".into(),
        );
        launched?;
        ended?;
        let mut exec: cu::CUgraphExec = ptr::null_mut();
        // SAFETY: graph is the captured graph; exec receives an executable copy
        let instantiated = check(
            unsafe { cu::cuGraphInstantiateWithFlags(&mut exec, graph, 0) },
            || "instantiating the captured step".into(),
        );
        // SAFETY: the executable graph does not need the graph it was made from
        unsafe { cu::cuGraphDestroy(graph) };
        instantiated?;
        if let Some(old) = self.graph.replace(exec) {
            // SAFETY: no replay of the old graph is pending: every step synchronises
            unsafe { cu::cuGraphExecDestroy(old) };
        }
        Ok(())
    }
}

/// The counting kernel's module for `arch`, and its function.
fn load_finite(arch: &str) -> Result<(cu::CUmodule, cu::CUfunction), RuntimeError> {
    let kernel = finite::count_kernel();
    let module = load_module(&ptx::module(&[&kernel], arch))?;
    let name = CString::new(finite::NAME).expect("no NUL");
    let mut function: cu::CUfunction = ptr::null_mut();
    // SAFETY: module is loaded; function receives a handle owned by it
    check(
        unsafe { cu::cuModuleGetFunction(&mut function, module, name.as_ptr()) },
        || format!("finding kernel {} in its module", finite::NAME),
    )?;
    Ok((module, function))
}

/// An error, before allocating, if `bytes` exceed the device's free memory.
fn check_free_memory(bytes: u64, device: &str) -> Result<(), RuntimeError> {
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: both receive sizes; the context is current
    check(
        unsafe { cu::cuMemGetInfo_v2(&mut free, &mut total) },
        || "reading the free device memory".into(),
    )?;
    if bytes > free as u64 {
        return Err(RuntimeError::Setup(format!(
            "the step's arena needs {:.2} GiB of device memory; {device} has {:.2} GiB free of {:.2}",
            bytes as f64 / GIB,
            free as f64 / GIB,
            total as f64 / GIB
        )));
    }
    Ok(())
}

/// Loads PTX through `cuModuleLoadDataEx` with an error log; a failure carries the log and the
/// kernels its line numbers point at.
fn load_module(ptx: &str) -> Result<cu::CUmodule, RuntimeError> {
    let text = CString::new(ptx)
        .map_err(|_| RuntimeError::Setup("the PTX module contains a NUL byte".into()))?;
    let mut error_log = vec![0u8; LOG_BYTES];
    let mut options = [
        cu::CUjit_option::CU_JIT_ERROR_LOG_BUFFER,
        cu::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES,
    ];
    // cuModuleLoadDataEx takes values that fit a pointer by value, cast to void*
    let mut values = [
        error_log.as_mut_ptr() as *mut c_void,
        LOG_BYTES as *mut c_void,
    ];
    let mut module: cu::CUmodule = ptr::null_mut();
    // SAFETY: text is NUL-terminated; the log buffer outlives the call and its size is given
    let result = unsafe {
        cu::cuModuleLoadDataEx(
            &mut module,
            text.as_ptr() as *const c_void,
            options.len() as u32,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    if result == cu::CUresult::CUDA_SUCCESS {
        return Ok(module);
    }
    let log = String::from_utf8_lossy(
        &error_log[..error_log.iter().position(|&b| b == 0).unwrap_or(LOG_BYTES)],
    )
    .trim()
    .to_string();
    let kernels = ptx::kernels_in_log(ptx, &log);
    let what = if kernels.is_empty() {
        "loading the PTX module".to_string()
    } else {
        format!("loading the PTX module (kernel {})", kernels.join(", "))
    };
    Err(RuntimeError::Device {
        what,
        message: format!("{}\n{log}", describe(result)),
    })
}

impl Backend for CudaBackend {
    fn describe(&self) -> String {
        self.description.clone()
    }

    fn frees_the_host(&self) -> bool {
        true
    }

    fn write(&mut self, buffer: &Buffer, words: &[u32]) -> Result<(), RuntimeError> {
        let bytes = 4 * words.len();
        if bytes as u64 > buffer.bytes {
            return Err(RuntimeError::Setup(format!(
                "{} words for buffer {} of {} bytes",
                words.len(),
                buffer.name,
                buffer.bytes
            )));
        }
        // SAFETY: the destination range lies inside the arena; the source outlives the copy,
        // which completes before the synchronisation below returns
        let result = unsafe {
            cu::cuMemcpyHtoDAsync_v2(
                self.arena + buffer.offset,
                words.as_ptr() as *const c_void,
                bytes,
                self.stream.as_inner(),
            )
        };
        check(result, || {
            format!("copying {bytes} bytes to buffer {}", buffer.name)
        })?;
        self.synchronize(|| format!("copying to buffer {}", buffer.name))
    }

    fn read(&mut self, buffer: &Buffer) -> Result<Vec<u32>, RuntimeError> {
        let mut words = vec![0u32; (buffer.bytes / 4) as usize];
        // SAFETY: the source range lies inside the arena; the destination holds buffer.bytes
        // bytes and outlives the copy (synchronised below)
        let result = unsafe {
            cu::cuMemcpyDtoHAsync_v2(
                words.as_mut_ptr() as *mut c_void,
                self.arena + buffer.offset,
                4 * words.len(),
                self.stream.as_inner(),
            )
        };
        check(result, || {
            format!("copying buffer {} to the host", buffer.name)
        })?;
        self.synchronize(|| format!("copying buffer {} to the host", buffer.name))?;
        Ok(words)
    }

    fn run_node(&mut self, node: usize) -> Result<(), RuntimeError> {
        let planned = &self.plan.nodes[node];
        for i in planned.first_launch..planned.first_launch + planned.launch_count {
            self.launch(i)?;
        }
        let (layer, op) = (planned.layer.clone(), planned.op.clone());
        self.synchronize(|| format!("running layer '{layer}' ({op})"))
    }

    fn run_step(&mut self) -> Result<f64, RuntimeError> {
        self.start
            .record(&self.stream)
            .map_err(cust_error("recording the start event"))?;
        match self.graph {
            // SAFETY: exec is a live executable graph of this context
            Some(exec) => check(
                unsafe { cu::cuGraphLaunch(exec, self.stream.as_inner()) },
                || "replaying the captured step".into(),
            )?,
            None => (0..self.plan.launches.len()).try_for_each(|i| self.launch(i))?,
        }
        self.stop
            .record(&self.stream)
            .map_err(cust_error("recording the stop event"))?;
        // an error raised inside a kernel surfaces here; `fisherc check` finds which one
        self.synchronize(|| {
            "running the step (run `fisherc check` to find the failing kernel)".into()
        })?;
        let ms = self
            .stop
            .elapsed_time_f32(&self.start)
            .map_err(cust_error("reading the step time"))?;
        Ok(ms as f64 / 1e3)
    }

    fn capture(&mut self) -> Result<bool, RuntimeError> {
        self.capture_graph()?;
        Ok(true)
    }

    /// One launch of the counting kernel per buffer, then one copy of all the counts.
    fn count_non_finite(&mut self, buffers: &[Buffer]) -> Result<Vec<u64>, RuntimeError> {
        let words = buffers.len() * finite::COUNTS;
        self.reserve_counts(words)?;
        for (i, buffer) in buffers.iter().enumerate() {
            self.launch_count(i, buffer)?;
        }
        let mut counts = vec![0u32; words];
        // SAFETY: the source holds at least `words` words (reserved above); the destination
        // outlives the copy, which completes before the synchronisation below returns
        let result = unsafe {
            cu::cuMemcpyDtoHAsync_v2(
                counts.as_mut_ptr() as *mut c_void,
                self.counts.0,
                4 * words,
                self.stream.as_inner(),
            )
        };
        check(result, || {
            "copying the non-finite counts to the host".into()
        })?;
        self.synchronize(|| "counting non-finite values".into())?;
        Ok(counts.chunks(finite::COUNTS).map(finite::total).collect())
    }

    /// An event before every node and after the last, all on the stream: the step runs as
    /// it does unprofiled (no synchronisation between kernels), and each node's time is the
    /// interval between its events.
    fn profile(&mut self) -> Result<Option<Vec<f64>>, RuntimeError> {
        let nodes = self.plan.nodes.len();
        let events = (0..=nodes)
            .map(|_| Event::new(EventFlags::DEFAULT))
            .collect::<Result<Vec<_>, _>>()
            .map_err(cust_error("creating the profiling events"))?;
        for (n, event) in events.iter().enumerate().take(nodes) {
            event
                .record(&self.stream)
                .map_err(cust_error("recording a profiling event"))?;
            let node = &self.plan.nodes[n];
            for i in node.first_launch..node.first_launch + node.launch_count {
                self.launch(i)?;
            }
        }
        events[nodes]
            .record(&self.stream)
            .map_err(cust_error("recording a profiling event"))?;
        self.synchronize(|| "running the profiled step".into())?;
        let times = events
            .windows(2)
            .map(|pair| pair[1].elapsed_time_f32(&pair[0]).map(|ms| ms as f64 / 1e3))
            .collect::<Result<Vec<_>, _>>()
            .map_err(cust_error("reading the profiling events"))?;
        Ok(Some(times))
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // SAFETY: all of these were created by this backend, in its context (still alive: it
        // is the last field), and nothing is in flight (every call synchronises)
        unsafe {
            if let Some(exec) = self.graph.take() {
                cu::cuGraphExecDestroy(exec);
            }
            cu::cuMemFree_v2(self.arena);
            if self.counts.1 > 0 {
                cu::cuMemFree_v2(self.counts.0);
            }
            cu::cuModuleUnload(self.module);
            cu::cuModuleUnload(self.finite.0);
        }
    }
}
