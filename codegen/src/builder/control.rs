//! Control flow: predicated blocks, loops, barriers, and warp and block reductions.

use super::*;

impl KernelBuilder {
    // ---- control flow ----

    /// Runs `body` in the threads where `p` holds.
    pub fn when(&mut self, p: Pred, body: impl FnOnce(&mut Self)) {
        self.stack.push(Vec::new());
        body(self);
        let then = self.stack.pop().expect("pushed above");
        self.stack
            .last_mut()
            .expect("a list")
            .push(Stmt::If { cond: p.0, then });
    }

    /// `for (i = start; i < end; i += step) body(i)` over u32.
    pub fn for_u32(
        &mut self,
        start: impl Into<UOp>,
        end: impl Into<UOp>,
        step: impl Into<UOp>,
        body: impl FnOnce(&mut Self, U32),
    ) {
        let step = step.into().0;
        let i = self.reg(Ty::U32);
        self.emit(Inst::Mov {
            dst: i,
            src: start.into().0,
        });
        let end = end.into();
        let enter = self.cmp_u(Cmp::Lt, U32(i), end);
        self.when(enter, |k| {
            k.stack.push(Vec::new());
            body(k, U32(i));
            k.emit(Inst::Bin {
                op: BinOp::Add,
                dst: i,
                a: i.into(),
                b: step,
            });
            let again = k.cmp_u(Cmp::Lt, U32(i), end);
            let body = k.stack.pop().expect("pushed above");
            k.stack.last_mut().expect("a list").push(Stmt::Loop {
                body,
                repeat: again.0,
            });
        });
    }

    /// `for (i = start; i < end; i += step) body(i)` over element indices.
    pub fn for_idx(&mut self, start: Idx, end: u64, step: Idx, body: impl FnOnce(&mut Self, Idx)) {
        let i = self.reg(self.index);
        self.emit(Inst::Mov {
            dst: i,
            src: start.into(),
        });
        let enter = self.idx_lt(Idx(i), end);
        self.when(enter, |k| {
            k.stack.push(Vec::new());
            body(k, Idx(i));
            k.emit(Inst::Bin {
                op: BinOp::Add,
                dst: i,
                a: i.into(),
                b: step.into(),
            });
            let again = k.idx_lt(Idx(i), end);
            let body = k.stack.pop().expect("pushed above");
            k.stack.last_mut().expect("a list").push(Stmt::Loop {
                body,
                repeat: again.0,
            });
        });
    }

    /// Grid-stride loop over `0..n`: each thread takes every `grid threads`-th element.
    pub fn for_each_element(&mut self, n: u64, body: impl FnOnce(&mut Self, Idx)) {
        let start = self.global_thread();
        let step = self.grid_threads();
        self.for_idx(start, n, step, body);
    }

    /// `bar.sync`: every thread of the block waits (must not be inside divergent code).
    pub fn barrier(&mut self) {
        self.emit(Inst::Bar);
    }

    pub fn shfl_down(&mut self, v: F32, delta: u32) -> F32 {
        F32(self.def(Ty::F32, |dst| Inst::ShflDown {
            dst,
            src: v.0,
            delta,
        }))
    }

    /// Sums each of `values` over the whole block (warp shuffles, then shared memory). Every
    /// thread gets the totals. Call from non-divergent code only.
    pub fn block_sum(&mut self, values: &[F32]) -> Vec<F32> {
        let warps = self.block / WARP;
        let partials: Vec<F32> = values.iter().map(|&v| self.warp_sum(v)).collect();
        let scratch = self.shared(warps * values.len() as u32);
        let totals_area = self.shared(values.len() as u32);
        let tid = self.tid();
        let lane = self.ubin(BinOp::Rem, tid, WARP);
        let warp = self.ubin(BinOp::Div, tid, WARP);
        let first_lane = self.cmp_u(Cmp::Eq, lane, 0u32);
        self.when(first_lane, |k| {
            for (j, &p) in partials.iter().enumerate() {
                let slot = k.mad_u(j as u32, warps, warp);
                k.store_shared(scratch, slot, p);
            }
        });
        self.barrier();
        let first_thread = self.cmp_u(Cmp::Eq, tid, 0u32);
        self.when(first_thread, |k| {
            for j in 0..values.len() as u32 {
                let total = k.f32(0.0);
                for w in 0..warps {
                    let v = k.load_shared(scratch, j * warps + w);
                    k.accumulate(total, v);
                }
                k.store_shared(totals_area, j, total);
            }
        });
        self.barrier();
        let totals = (0..values.len() as u32)
            .map(|j| self.load_shared(totals_area, j))
            .collect();
        self.barrier(); // the scratch may be reused right after
        totals
    }

    /// Sums a value over the warp; lane 0 holds the total. Every lane of the warp must run it.
    pub fn warp_sum(&mut self, v: F32) -> F32 {
        let acc = self.f32(0.0);
        self.assign(acc, v);
        let mut delta = WARP / 2;
        while delta > 0 {
            let other = self.shfl_down(acc, delta);
            self.accumulate(acc, other);
            delta /= 2;
        }
        acc
    }
}
