//! Extraction that counts a shared node once.
//!
//! 1. **Greedy DAG extraction.** Every e-class keeps its best node so far and the set of classes
//!    that node's sub-DAG uses; a node costs its own cost plus the own cost of every class in
//!    the union of its children's sets, each counted once, so a tuple feeding several
//!    projections (or a value with several readers) is paid for once. egg's tree extractor
//!    would pay for it at every use. A node whose set would contain its own class closes a
//!    cycle and is never chosen. Classes are revisited (worklist) until no choice improves.
//! 2. **Local search** on the whole DAG's cost (only on acyclic e-graphs, which is what the
//!    rules produce): switch one class to another node, or every reader of a tuple to that
//!    tuple's projections at once, keeping a move when it lowers the total. Costs are kept
//!    incrementally with reference counts, so a move costs the size of what it changes.

use std::collections::{HashMap, VecDeque};

use egg::{Id, Language};
use fixedbitset::FixedBitSet;

use super::ExtractionError;
use super::lang::{EGraph, ENode, PROJ};

/// Chooses a node for every class reachable from `root`, minimising the summed own cost of the
/// chosen DAG. `own_cost(class, node)` is a node's cost without its children (infinite for a
/// node that must not be chosen).
pub fn extract(
    egraph: &EGraph,
    root: Id,
    own_cost: impl Fn(Id, &ENode) -> f64,
) -> Result<HashMap<Id, ENode>, ExtractionError> {
    let problem = Problem::new(egraph, root, own_cost);
    let mut choice = problem.greedy();
    if problem.is_acyclic() {
        problem.refine(&mut choice);
    }
    let order = problem
        .reachable(&choice)
        .ok_or("the extraction has a cycle or a class without an extractable node")?;
    Ok(order
        .into_iter()
        .map(|c| {
            let node = &egraph[problem.classes[c]].nodes[choice[c].expect("reachable")];
            (problem.classes[c], node.clone())
        })
        .collect())
}

/// The e-graph with dense class indices, children resolved, costs computed.
struct Problem {
    classes: Vec<Id>,
    /// Per class, per node: the dense indices of its children.
    children: Vec<Vec<Vec<usize>>>,
    costs: Vec<Vec<f64>>,
    /// Per class, per node: the tuple class it projects, for `proj` nodes.
    projects: Vec<Vec<Option<usize>>>,
    is_leaf: Vec<bool>,
    root: usize,
}

impl Problem {
    fn new(egraph: &EGraph, root: Id, own_cost: impl Fn(Id, &ENode) -> f64) -> Problem {
        let classes: Vec<Id> = egraph.classes().map(|c| c.id).collect();
        let index: HashMap<Id, usize> = classes.iter().enumerate().map(|(i, &c)| (c, i)).collect();
        let dense = |id: &Id| index[&egraph.find(*id)];
        let nodes = |c: &Id| egraph[*c].nodes.iter();
        Problem {
            children: classes
                .iter()
                .map(|c| {
                    nodes(c)
                        .map(|n| n.children().iter().map(dense).collect())
                        .collect()
                })
                .collect(),
            costs: classes
                .iter()
                .map(|&c| nodes(&c).map(|n| own_cost(c, n)).collect())
                .collect(),
            projects: classes
                .iter()
                .map(|c| {
                    nodes(c)
                        .map(|n| (n.name() == PROJ).then(|| dense(&n.inputs()[0])))
                        .collect()
                })
                .collect(),
            is_leaf: classes
                .iter()
                .map(|c| nodes(c).all(|n| matches!(n, ENode::Attr(_))))
                .collect(),
            root: dense(&root),
            classes,
        }
    }

    fn len(&self) -> usize {
        self.classes.len()
    }

    // ---- 1. greedy ----

    fn greedy(&self) -> Vec<Option<usize>> {
        let mut parents: Vec<Vec<(usize, usize)>> = vec![Vec::new(); self.len()];
        let mut queue = VecDeque::new();
        for (i, nodes) in self.children.iter().enumerate() {
            for (j, children) in nodes.iter().enumerate() {
                for &child in children {
                    parents[child].push((i, j));
                }
                if children.is_empty() {
                    queue.push_back((i, j));
                }
            }
        }
        let mut best: Vec<Option<Best>> = (0..self.len()).map(|_| None).collect();
        while let Some((i, j)) = queue.pop_front() {
            let own = self.costs[i][j];
            if !own.is_finite() {
                continue;
            }
            let Some(mut uses) = self.union_of_children(&best, i, j) else {
                continue;
            };
            if uses.contains(i) {
                continue; // a cycle through this class
            }
            let total = own
                + uses
                    .ones()
                    .map(|k| best[k].as_ref().map_or(0.0, |b| b.own))
                    .sum::<f64>();
            let candidate = (total, self.projects[i][j].is_some());
            if best[i]
                .as_ref()
                .is_some_and(|b| !better(candidate, (b.total, self.projects[i][b.node].is_some())))
            {
                continue;
            }
            if !self.is_leaf[i] {
                uses.insert(i);
            }
            best[i] = Some(Best {
                node: j,
                own,
                total,
                uses,
            });
            queue.extend(parents[i].iter().copied());
        }
        best.iter().map(|b| b.as_ref().map(|b| b.node)).collect()
    }

    /// The union of the children's sets, or `None` while some child has no choice yet.
    fn union_of_children(
        &self,
        best: &[Option<Best>],
        class: usize,
        node: usize,
    ) -> Option<FixedBitSet> {
        let mut uses = FixedBitSet::with_capacity(self.len());
        for &child in &self.children[class][node] {
            uses.union_with(&best[child].as_ref()?.uses);
        }
        Some(uses)
    }

    // ---- the chosen DAG ----

    /// Classes reachable from the root under `choice`, children first; `None` on a cycle or a
    /// class without a choice.
    fn reachable(&self, choice: &[Option<usize>]) -> Option<Vec<usize>> {
        const NEW: u8 = 0;
        const OPEN: u8 = 1;
        const DONE: u8 = 2;
        let mut state = vec![NEW; self.len()];
        let mut order = Vec::new();
        let mut stack = vec![(self.root, false)];
        while let Some((class, children_done)) = stack.pop() {
            if children_done {
                state[class] = DONE;
                order.push(class);
                continue;
            }
            match state[class] {
                DONE => continue,
                OPEN => return None,
                _ => {}
            }
            state[class] = OPEN;
            stack.push((class, true));
            for &child in &self.children[class][choice[class]?] {
                match state[child] {
                    OPEN => return None,
                    NEW => stack.push((child, false)),
                    _ => {}
                }
            }
        }
        Some(order)
    }

    /// Whether no class can reach itself through any node (then no choice has a cycle).
    fn is_acyclic(&self) -> bool {
        let mut pending: Vec<usize> = self
            .children
            .iter()
            .map(|nodes| nodes.iter().map(Vec::len).sum())
            .collect();
        let mut parents: Vec<Vec<usize>> = vec![Vec::new(); self.len()];
        for (i, nodes) in self.children.iter().enumerate() {
            for &child in nodes.iter().flatten() {
                parents[child].push(i);
            }
        }
        let mut ready: Vec<usize> = (0..self.len()).filter(|&i| pending[i] == 0).collect();
        let mut done = 0;
        while let Some(class) = ready.pop() {
            done += 1;
            for &parent in &parents[class] {
                pending[parent] -= 1;
                if pending[parent] == 0 {
                    ready.push(parent);
                }
            }
        }
        done == self.len()
    }

    // ---- 2. local search ----

    /// Improves the choice by moves on the whole DAG's cost; see the module docs. The first
    /// rounds also accept moves that cost almost nothing (a fused node a few bytes dearer than
    /// the op it replaces), because a saving often needs two such moves in a row; the best
    /// choice seen is kept.
    fn refine(&self, choice: &mut Vec<Option<usize>>) {
        let mut projections: HashMap<usize, Vec<(usize, usize)>> = HashMap::new();
        for (class, nodes) in self.projects.iter().enumerate() {
            for (j, tuple) in nodes.iter().enumerate() {
                if let Some(tuple) = tuple {
                    projections.entry(*tuple).or_default().push((class, j));
                }
            }
        }
        let mut dag = Counted::new(self, std::mem::take(choice));
        let mut best = (dag.total, dag.choice.clone());
        for round in 0..REFINE_ROUNDS {
            let exploring = round < EXPLORE_ROUNDS;
            let tolerance = if exploring {
                dag.total * EXPLORE_TOLERANCE
            } else {
                0.0
            };
            let mut improved = false;
            for class in 0..self.len() {
                for j in 0..self.costs[class].len() {
                    if dag.refs[class] == 0
                        || dag.choice[class] == Some(j)
                        || !self.costs[class][j].is_finite()
                    {
                        continue;
                    }
                    let moves = match self.projects[class][j] {
                        Some(tuple) => projections[&tuple].clone(),
                        None => vec![(class, j)],
                    };
                    if moves
                        .iter()
                        .any(|&(c, n)| self.children[c][n].iter().any(|&k| dag.choice[k].is_none()))
                    {
                        continue;
                    }
                    let before = dag.total;
                    let undo: Vec<(usize, Option<usize>)> = moves
                        .iter()
                        .map(|&(c, n)| (c, dag.switch(c, Some(n))))
                        .collect();
                    let gain = before - dag.total;
                    if gain > before * 1e-12 || (exploring && -gain <= tolerance) {
                        improved |= gain > before * 1e-12;
                        if dag.total < best.0 {
                            best = (dag.total, dag.choice.clone());
                        }
                    } else {
                        for &(c, old) in undo.iter().rev() {
                            dag.switch(c, old);
                        }
                    }
                }
            }
            dag.recount();
            if !exploring && !improved {
                break;
            }
        }
        *choice = best.1;
    }
}

/// Rounds of local search over all classes, the first of them exploring.
const REFINE_ROUNDS: usize = 10;
const EXPLORE_ROUNDS: usize = 4;
/// How much dearer (relative to the whole DAG) an exploring move may be.
const EXPLORE_TOLERANCE: f64 = 1e-4;

/// Within this relative margin, a projection of a tuple beats a stand-alone node: a fused node
/// with extra outputs costs a little more than the plain one, but its other outputs are then
/// free for whoever needs them, which a class-by-class greedy choice cannot see.
const SHARING_MARGIN: f64 = 0.02;

/// Whether `(total, is a projection)` beats the incumbent in the greedy phase.
fn better(candidate: (f64, bool), incumbent: (f64, bool)) -> bool {
    match (candidate.1, incumbent.1) {
        (true, false) => candidate.0 < incumbent.0 * (1.0 + SHARING_MARGIN),
        (false, true) => candidate.0 * (1.0 + SHARING_MARGIN) < incumbent.0,
        _ => candidate.0 < incumbent.0,
    }
}

struct Best {
    node: usize,
    own: f64,
    total: f64,
    /// Classes of the chosen sub-DAG, this one included (attribute leaves excluded).
    uses: FixedBitSet,
}

/// A choice with reference counts (chosen readers per class) and the cost of everything
/// reachable, kept up to date as classes switch nodes. Valid on acyclic e-graphs only.
struct Counted<'a> {
    problem: &'a Problem,
    choice: Vec<Option<usize>>,
    refs: Vec<u32>,
    total: f64,
}

impl<'a> Counted<'a> {
    fn new(problem: &'a Problem, choice: Vec<Option<usize>>) -> Self {
        let mut dag = Counted {
            problem,
            refs: vec![0; choice.len()],
            choice,
            total: 0.0,
        };
        dag.recount();
        dag
    }

    /// Recomputes counts and total from scratch (drops accumulated rounding).
    fn recount(&mut self) {
        self.refs.iter_mut().for_each(|r| *r = 0);
        self.total = 0.0;
        self.reference(self.problem.root);
    }

    fn own(&self, class: usize) -> f64 {
        self.choice[class].map_or(0.0, |n| self.problem.costs[class][n])
    }

    /// One more reader of `class`: if it was unreachable, it and its new sub-DAG count now.
    fn reference(&mut self, class: usize) {
        let mut stack = vec![class];
        while let Some(c) = stack.pop() {
            self.refs[c] += 1;
            if self.refs[c] == 1 {
                self.total += self.own(c);
                if let Some(n) = self.choice[c] {
                    stack.extend(&self.problem.children[c][n]);
                }
            }
        }
    }

    /// One reader fewer: if it was the last, `class` and what only it reached stop counting.
    fn release(&mut self, class: usize) {
        let mut stack = vec![class];
        while let Some(c) = stack.pop() {
            self.refs[c] -= 1;
            if self.refs[c] == 0 {
                self.total -= self.own(c);
                if let Some(n) = self.choice[c] {
                    stack.extend(&self.problem.children[c][n]);
                }
            }
        }
    }

    /// Switches `class` to `node`, returning its previous node.
    fn switch(&mut self, class: usize, node: Option<usize>) -> Option<usize> {
        let old = self.choice[class];
        if self.refs[class] > 0 {
            if let Some(n) = node {
                for &k in &self.problem.children[class][n] {
                    self.reference(k);
                }
            }
            self.total -= self.own(class);
            if let Some(o) = old {
                for &k in &self.problem.children[class][o] {
                    self.release(k);
                }
            }
            self.choice[class] = node;
            self.total += self.own(class);
        } else {
            self.choice[class] = node;
        }
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optimize::lang::Types;

    fn op(egraph: &mut EGraph, name: &str, children: Vec<Id>) -> Id {
        egraph.add(ENode::Op(name.into(), children))
    }

    fn chosen(choices: &HashMap<Id, ENode>, egraph: &EGraph, class: Id) -> &'static str {
        choices[&egraph.find(class)].name()
    }

    #[test]
    fn a_cheaper_node_that_closes_a_cycle_is_never_chosen() {
        let mut egraph = EGraph::new(Types::default());
        let leaf = egraph.add(ENode::Attr("x".into()));
        let a = op(&mut egraph, "f", vec![leaf]);
        let loop_back = op(&mut egraph, "g", vec![a]);
        egraph.union(a, loop_back);
        let root = op(&mut egraph, "root", vec![a]);
        egraph.rebuild();
        let cost = |_: Id, n: &ENode| match n.name() {
            "g" => 0.1,
            "f" => 1.0,
            _ => 0.0,
        };
        let choices = extract(&egraph, root, cost).unwrap();
        assert_eq!(chosen(&choices, &egraph, a), "f");
    }

    #[test]
    fn a_tuple_read_twice_is_paid_for_once() {
        // class p holds "plain" (cost 3) and proj(t); class q holds "other" (cost 3) and
        // proj(t); t costs 4: the DAG cost of using t for both is 4 < 3 + 3, although t is
        // dearer than either plain node on its own
        let mut egraph = EGraph::new(Types::default());
        let leaf = egraph.add(ENode::Attr("x".into()));
        let t = op(&mut egraph, "tuple", vec![leaf]);
        let (i0, i1) = (
            egraph.add(ENode::Attr("0".into())),
            egraph.add(ENode::Attr("1".into())),
        );
        let p = op(&mut egraph, "plain", vec![leaf]);
        let q = op(&mut egraph, "other", vec![leaf]);
        let p_of_t = op(&mut egraph, PROJ, vec![i0, t]);
        let q_of_t = op(&mut egraph, PROJ, vec![i1, t]);
        egraph.union(p, p_of_t);
        egraph.union(q, q_of_t);
        let root = op(&mut egraph, "root", vec![p, q]);
        egraph.rebuild();
        let cost = |_: Id, n: &ENode| match n.name() {
            "tuple" => 4.0,
            "plain" | "other" => 3.0,
            _ => 0.0,
        };
        let choices = extract(&egraph, root, cost).unwrap();
        assert_eq!(chosen(&choices, &egraph, p), PROJ);
        assert_eq!(chosen(&choices, &egraph, q), PROJ);
    }
}
