//! The noisy SGD update: one thread per element; drawn noise comes from `rng`, bit-identical
//! to the CPU's.
//!
//! A single parameter's update is a grid-stride map. A group of them
//! ([`NoisySgdUpdateGroup`]) runs as few launches as the parameter space allows: members that
//! compute alike (weight decay, noise, the Fisher factor) share a launch, each member a run of
//! whole blocks of the grid, one element a thread; a block finds its member by a binary search
//! over the members' first blocks (immediates), which loads that member's pointers.

use fisherc_ir::ops::{
    FloatAttr, Groupable, MemberPorts, NoisySgdUpdate, NoisySgdUpdateGroup, Op, UpdateNoise,
};

use super::common::{
    Cx, grid_for, input, launch, map, member_blocks, output, within_parameter_space,
};
use super::rng::{normal, split};
use super::{Launch, LaunchArg, Lowered};
use crate::builder::{F32, Idx, KernelBuilder, U32, U64};

/// The op, whose associated constants are its input positions.
type U = NoisySgdUpdate;

/// The shared scalars' input positions: lr, μ, wd, s, seed and step (a group's first inputs).
const SHARED: std::ops::Range<usize> = <U as Groupable>::SHARED;

pub fn lower(cx: &Cx) -> Lowered {
    match cx.op {
        Op::NoisySgdUpdate(update) => lower_one(cx, update),
        Op::NoisySgdUpdateGroup(group) => lower_group(cx, group),
        other => unreachable!("{} is not an update", other.name()),
    }
}

/// The scalars every element's update reads: lr, μ, wd, s and the Philox key and step.
struct Scalars {
    lr: F32,
    mu: F32,
    wd: F32,
    s: F32,
    seed: [U32; 2],
    step: [U32; 2],
}

impl Scalars {
    /// Loads them from pointers to lr, μ, wd, s, seed and step (the update's order).
    fn load(k: &mut KernelBuilder, at: &[U64]) -> Scalars {
        let [lr, mu, wd, s, seed, step] = at else {
            unreachable!("six shared scalars")
        };
        let (lr, mu, wd, s) = (
            k.load(*lr, 0u32),
            k.load(*mu, 0u32),
            k.load(*wd, 0u32),
            k.load(*s, 0u32),
        );
        let (seed, step) = (k.load_u64(*seed, 0), k.load_u64(*step, 0));
        let (seed_lo, seed_hi) = split(k, seed);
        let (step_lo, step_hi) = split(k, step);
        Scalars {
            lr,
            mu,
            wd,
            s,
            seed: [seed_lo, seed_hi],
            step: [step_lo, step_hi],
        }
    }
}

/// One parameter's tensors: inputs θ, v, g and the noise input; outputs θ', v' and F̂.
#[derive(Clone, Copy)]
struct Tensors {
    theta: U64,
    v: U64,
    g: U64,
    noise: Option<U64>,
    new_theta: U64,
    new_v: U64,
    fisher: Option<U64>,
}

impl Tensors {
    /// Pointer parameters for `update`'s tensors, named after `tag`, in [`Self::args`] order.
    fn params(k: &mut KernelBuilder, update: &NoisySgdUpdate, tag: &str) -> Tensors {
        let mut p = |name: &str| k.ptr_param(&format!("{name}{tag}"));
        let (theta, v, g) = (p("theta"), p("v"), p("g"));
        let noise = (update.noise != UpdateNoise::None).then(|| p("noise"));
        let (new_theta, new_v) = (p("new_theta"), p("new_v"));
        let fisher = update.fisher_factor.map(|_| p("fisher"));
        Tensors {
            theta,
            v,
            g,
            noise,
            new_theta,
            new_v,
            fisher,
        }
    }

    /// How many pointers `update` passes: its own inputs and its outputs.
    fn count(update: &NoisySgdUpdate) -> usize {
        update.input_count() - SHARED.len() + update.output_count()
    }

    /// The launch arguments of [`Self::params`]: the member's own inputs (group positions
    /// `inputs`, the member's order) and outputs.
    fn args(
        update: &NoisySgdUpdate,
        inputs: &[usize],
        outputs: std::ops::Range<usize>,
    ) -> Vec<LaunchArg> {
        let mut args: Vec<LaunchArg> = [U::THETA, U::VELOCITY, U::GRAD]
            .iter()
            .map(|&i| input(inputs[i]))
            .collect();
        if update.noise != UpdateNoise::None {
            args.push(input(inputs[U::NOISE]));
        }
        args.extend(outputs.map(output));
        args
    }

    /// Fresh registers a group's dispatch fills in.
    fn unset(k: &mut KernelBuilder, update: &NoisySgdUpdate) -> Tensors {
        let mut ptr = || k.null_ptr();
        Tensors {
            theta: ptr(),
            v: ptr(),
            g: ptr(),
            noise: (update.noise != UpdateNoise::None).then(&mut ptr),
            new_theta: ptr(),
            new_v: ptr(),
            fisher: update.fisher_factor.map(|_| ptr()),
        }
    }

    /// The pointers it has, in [`Self::params`] order.
    fn pointers(self) -> Vec<U64> {
        let t = self;
        [
            Some(t.theta),
            Some(t.v),
            Some(t.g),
            t.noise,
            Some(t.new_theta),
            Some(t.new_v),
            t.fisher,
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Sets these registers (from [`Self::unset`]) to `from`'s pointers.
    fn assign(self, k: &mut KernelBuilder, from: Tensors) {
        for (dst, src) in self.pointers().into_iter().zip(from.pointers()) {
            k.assign_ptr(dst, src);
        }
    }
}

/// Updates element `i` of the parameter whose noise stream is `param`.
fn update_element(
    k: &mut KernelBuilder,
    update: &NoisySgdUpdate,
    (x, t): (&Scalars, Tensors),
    i: Idx,
    param: U32,
) {
    let (theta, v, g) = (k.load(t.theta, i), k.load(t.v, i), k.load(t.g, i));
    let d = k.f32(0.0);
    k.assign(d, g);
    let variance = match (update.noise, t.noise) {
        (UpdateNoise::None, _) => None,
        (UpdateNoise::Diagonal, Some(noise)) => {
            let estimate = k.load(noise, i);
            // F̂ = f·S made here, as `scale` makes it, and written for the step's output
            Some(match (update.fisher_factor, t.fisher) {
                (Some(factor), Some(out)) => {
                    let scaled = k.mul(estimate, factor.0 as f32);
                    k.store(out, i, scaled);
                    scaled
                }
                _ => estimate,
            })
        }
        (UpdateNoise::Scalar, Some(noise)) => Some(k.load(noise, 0u32)),
        (UpdateNoise::Vector, Some(noise)) => {
            let e = k.load(noise, i);
            let eps = k.mul(x.s, e);
            k.accumulate(d, eps);
            None
        }
        (noise, None) => unreachable!("{noise:?} noise without its input"),
    };
    if let Some(variance) = variance {
        let xi = normal(k, i, param, x.seed, x.step);
        let root = k.sqrt(variance);
        let amplitude = k.mul(x.s, root);
        let eps = k.mul(amplitude, xi);
        k.accumulate(d, eps);
    }
    if update.decay {
        let decay = k.mul(x.wd, theta);
        k.accumulate(d, decay);
    }
    let kept = k.mul(x.mu, v);
    let velocity = k.add(kept, d);
    let stepped = k.mul(x.lr, velocity);
    let theta2 = k.sub(theta, stepped);
    k.store(t.new_v, i, velocity);
    k.store(t.new_theta, i, theta2);
}

fn lower_one(cx: &Cx, update: &NoisySgdUpdate) -> Lowered {
    let n = cx.inputs[U::THETA].numel() as u64;
    let mut k = cx.builder("update");
    let shared: Vec<U64> = SHARED.map(|i| k.ptr_param(&format!("in{i}"))).collect();
    let tensors = Tensors::params(&mut k, update, "");
    // an argument, not an immediate: parameters of one size share one kernel
    let param = k.u32_param("param");
    let scalars = Scalars::load(&mut k, &shared);
    map(&mut k, n, |k, i| {
        update_element(k, update, (&scalars, tensors), i, param)
    });
    let mut args: Vec<LaunchArg> = SHARED.map(input).collect();
    let inputs: Vec<usize> = (0..cx.inputs.len()).collect();
    args.extend(Tensors::args(update, &inputs, 0..update.output_count()));
    args.push(LaunchArg::U32(update.param));
    Lowered::kernels(vec![launch(k.finish(), grid_for(n), args)])
}

/// One member of a group's launch: its update, its ports in the group and its elements.
struct Member<'a> {
    update: &'a NoisySgdUpdate,
    ports: MemberPorts,
    elements: u32,
}

impl Member<'_> {
    /// What must match for members to share a kernel body (the factor is an immediate).
    fn body(&self) -> (bool, UpdateNoise, Option<FloatAttr>) {
        let u = self.update;
        (u.decay, u.noise, u.fisher_factor)
    }
}

fn lower_group(cx: &Cx, group: &NoisySgdUpdateGroup) -> Lowered {
    let members: Vec<Member> = group
        .members
        .iter()
        .zip(group.ports())
        .map(|(update, ports)| Member {
            update,
            elements: cx.inputs[ports.inputs[U::THETA]].numel() as u32,
            ports,
        })
        .collect();
    // alike members together, in group order
    let mut bodies = Vec::new();
    for body in members.iter().map(Member::body) {
        if !bodies.contains(&body) {
            bodies.push(body);
        }
    }
    let mut launches = Vec::new();
    for body in bodies {
        let alike: Vec<&Member> = members.iter().filter(|m| m.body() == body).collect();
        let pointers = Tensors::count(alike[0].update);
        for set in within_parameter_space(&alike, SHARED.len(), pointers) {
            launches.push(group_launch(cx, launches.len(), set));
        }
    }
    Lowered::kernels(launches)
}

/// One launch over `set`, members alike.
fn group_launch(cx: &Cx, index: usize, set: &[&Member]) -> Launch {
    let mut k = cx.builder(&format!("update{index}"));
    let shared: Vec<U64> = SHARED.map(|i| k.ptr_param(&format!("in{i}"))).collect();
    let like = set[0].update;
    let (tensors, param) = (Tensors::unset(&mut k, like), k.u32(0));
    let elements: Vec<u32> = set.iter().map(|m| m.elements).collect();
    let thread = member_blocks(&mut k, &elements, &mut |k, m| {
        let own = Tensors::params(k, set[m].update, &m.to_string());
        tensors.assign(k, own);
        k.assign_u(param, set[m].update.param);
    });
    let scalars = Scalars::load(&mut k, &shared);
    k.when(thread.inside, |k| {
        let i = k.idx(thread.element);
        update_element(k, like, (&scalars, tensors), i, param);
    });
    let mut args: Vec<LaunchArg> = (0..SHARED.len()).map(input).collect();
    for m in set {
        args.extend(Tensors::args(
            m.update,
            &m.ports.inputs,
            m.ports.outputs.clone(),
        ));
    }
    launch(k.finish(), thread.grid, args)
}
