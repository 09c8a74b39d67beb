//! The rewrite rules, each an equality of the CPU reference semantics with a readable name.
//!
//! Simple ones are pattern pairs whose right-hand side is type-checked before it is added
//! ([`Checked`]). Fusions are a searcher pattern plus Rust code
//! ([`Fusion`]) that builds the fused op from the matched attributes, checks its shapes with
//! the op's own shape rule before adding anything, and unions the fused outputs with every
//! value they equal. Fused tuples are added next to the unfused nodes, never instead of them:
//! the extractor decides, by cost, which form each value takes.

use egg::{Applier, ENodeOrVar, Id, Pattern, PatternAst, Rewrite, Searcher, Subst, Symbol, Var};

use super::convert::{op_node, proj, set_origin};
use super::lang::{EGraph, ENode, Origin, Types, attr_symbol, decode, value_type};
use crate::ops::{
    BnBackwardReduce, BnBackwardReduceSq, BnRelu, ChannelSum, ChannelSumSq, Elementwise, FloatAttr,
    FusedConv, FusedDgrad, FusedWgrad, Instr, LinearWgrad, LinearWgradSq, NoisySgdUpdate, Op,
    ReluBackwardBnReduce, Scale, Square, Squares,
};
use crate::tensor::TensorType;

pub type Rule = Rewrite<ENode, Types>;

/// Every rule of the optimizer.
pub fn all() -> Vec<Rule> {
    let mut rules = scalar_rules();
    rules.extend(square_rules());
    rules.extend(forward_rules());
    rules.extend(backward_rules());
    rules.extend(elementwise_rules());
    rules.extend(update_rules());
    rules
}

/// The rules with these names, in this order.
pub fn named(names: &[&str]) -> Result<Vec<Rule>, UnknownRule> {
    let mut rules: Vec<Option<Rule>> = all().into_iter().map(Some).collect();
    names
        .iter()
        .map(|name| {
            rules
                .iter_mut()
                .find(|r| r.as_ref().is_some_and(|r| r.name.as_str() == *name))
                .and_then(Option::take)
                .ok_or_else(|| UnknownRule(name.to_string()))
        })
        .collect()
}

/// A rule name that [`all`] does not have.
#[derive(Debug, thiserror::Error)]
#[error("no rule named '{0}'")]
pub struct UnknownRule(pub String);

/// Rules that keep the fusion rules, which match on plain squares of gradients, from being
/// blocked by constant factors (1/M of the mean loss, M of the per-example gradient).
pub fn scalar_rules() -> Vec<Rule> {
    vec![
        fusion(
            "square-of-scale",
            "(square ?s (scale ?f ?x))",
            square_of_scale,
        ),
        fusion("scale-of-scale", "(scale ?f (scale ?g ?x))", scale_of_scale),
        checked(
            "mean-of-scale",
            "(batch_mean ?m (scale ?f ?x))",
            "(scale ?f (batch_mean ?m ?x))",
        ),
        checked(
            "conv-wgrad-of-scaled-gradient",
            "(conv_wgrad ?a ?x (scale ?f ?dy))",
            "(scale ?f (conv_wgrad ?a ?x ?dy))",
        ),
        checked(
            "linear-wgrad-of-scaled-gradient",
            "(linear_wgrad ?a ?x (scale ?f ?dy))",
            "(scale ?f (linear_wgrad ?a ?x ?dy))",
        ),
        checked(
            "channel-sum-of-scale",
            "(channel_sum ?a (scale ?f ?x))",
            "(scale ?f (channel_sum ?a ?x))",
        ),
        fusion(
            "bn-squares-of-scaled-gradient",
            "(proj ?i (bn_param_grads_sq ?e (scale ?f ?dy) ?x ?m ?v))",
            bn_squares_of_scaled_gradient,
        ),
    ]
}

/// Rules that compute a gradient and its Fisher squares in one node.
pub fn square_rules() -> Vec<Rule> {
    vec![
        fusion(
            "conv-wgrad-with-exact-squares",
            "(batch_mean ?n (square ?s (conv_wgrad_per_example ?a ?x ?dy)))",
            |f, s| conv_wgrad_with_squares(f, s, Squares::PerExample),
        ),
        fusion(
            "conv-wgrad-with-a2g2-squares",
            "(conv_wgrad ?a (square ?s ?x) (square ?t ?dy))",
            |f, s| conv_wgrad_with_squares(f, s, Squares::PerPosition),
        ),
        fusion(
            "linear-wgrad-with-exact-squares",
            "(batch_mean ?n (square ?s (linear_wgrad_per_example ?a ?x ?dy)))",
            |f, s| linear_wgrad_with_squares(f, s, true),
        ),
        fusion(
            "linear-wgrad-with-a2g2-squares",
            "(linear_wgrad ?a (square ?s ?x) (square ?t ?dy))",
            |f, s| linear_wgrad_with_squares(f, s, false),
        ),
        fusion(
            "bias-grad-with-exact-squares",
            "(batch_mean ?n (square ?s (channel_sum_per_example ?a ?dy)))",
            |f, s| bias_grad_with_squares(f, s, Squares::PerExample),
        ),
        fusion(
            "row-grad-with-exact-squares",
            "(batch_mean ?n (square ?s ?dy))",
            row_grad_with_squares,
        ),
        fusion(
            "bias-grad-with-a2g2-squares",
            "(channel_sum ?a (square ?s ?dy))",
            |f, s| bias_grad_with_squares(f, s, Squares::PerPosition),
        ),
        fusion(
            "bn-grads-with-exact-squares",
            "(batch_mean ?n (square ?s (proj ?i (bn_param_grads_per_example ?e ?dy ?x ?m ?v))))",
            |f, s| bn_grads_with_squares(f, s, Squares::PerExample),
        ),
        fusion(
            "bn-grads-with-a2g2-squares",
            "(proj ?i (bn_param_grads_sq ?e ?dy ?x ?m ?v))",
            |f, s| bn_grads_with_squares(f, s, Squares::PerPosition),
        ),
    ]
}

/// Forward fusions: BN statistics into the producing convolution's epilogue, BN-apply + ReLU
/// into the consuming convolution's prologue (and recomputed in its weight gradient), and
/// BN-apply + residual add + ReLU as one pass where the activation must be stored.
pub fn forward_rules() -> Vec<Rule> {
    vec![
        checked(
            "bn-split",
            "(proj 0 (batch_norm ?e ?y ?g ?b))",
            "(bn_apply ?e ?y (proj 1 (batch_norm ?e ?y ?g ?b)) (proj 2 (batch_norm ?e ?y ?g ?b)) ?g ?b)",
        ),
        fusion(
            "bn-stats-in-conv-epilogue",
            "(batch_norm ?e ?y ?g ?b)",
            bn_stats_in_conv_epilogue,
        ),
        fusion(
            "bn-relu-in-conv-prologue",
            "(conv2d ?a (relu ?r (bn_apply ?e ?y ?m ?v ?g ?b)) ?w)",
            bn_relu_in_conv_prologue,
        ),
        fusion(
            "bn-relu-in-biased-conv-prologue",
            "(conv2d ?a (relu ?r (bn_apply ?e ?y ?m ?v ?g ?b)) ?w ?bias)",
            bn_relu_in_conv_prologue,
        ),
        fusion(
            "bn-relu-recomputed-in-wgrad",
            "(conv_wgrad ?a (relu ?r (bn_apply ?e ?y ?m ?v ?g ?b)) ?dy)",
            bn_relu_recomputed_in_wgrad,
        ),
        fusion(
            "bn-relu-recomputed-in-fused-wgrad",
            "(fused_wgrad ?a (relu ?r (bn_apply ?e ?y ?m ?v ?g ?b)) ?dy)",
            bn_relu_recomputed_in_wgrad,
        ),
        fusion(
            "bn-relu",
            "(relu ?r (bn_apply ?e ?y ?m ?v ?g ?b))",
            |f, s| bn_relu(f, s, false),
        ),
        fusion(
            "bn-add-relu",
            "(relu ?r (add ?p (bn_apply ?e ?y ?m ?v ?g ?b) ?s))",
            |f, s| bn_relu(f, s, true),
        ),
        fusion(
            "bn-add-relu-commuted",
            "(relu ?r (add ?p ?s (bn_apply ?e ?y ?m ?v ?g ?b)))",
            |f, s| bn_relu(f, s, true),
        ),
    ]
}

/// Backward fusions: dgrad with the ReLU-backward mask, and the BN-backward reductions (with
/// their squares) in the epilogue of whatever produces their gradient.
pub fn backward_rules() -> Vec<Rule> {
    vec![
        fusion(
            "dgrad-relu-backward",
            "(relu_backward ?r (conv_dgrad ?a ?dy ?w) (relu ?r2 (bn_apply ?e ?y ?m ?v ?g ?b)))",
            dgrad_relu_backward,
        ),
        fusion(
            "bn-reductions-in-producer",
            "(bn_backward_reduce ?e ?du ?y ?m ?v)",
            |f, s| bn_reductions_in_producer(f, s, Squares::None),
        ),
        fusion(
            "bn-reductions-with-squares-in-producer",
            "(bn_backward_reduce_sq ?e ?du ?y ?m ?v)",
            bn_reductions_with_squares_in_producer,
        ),
    ]
}

/// Chains of same-shape elementwise ops into one [`Elementwise`] node. (Scales are not lifted:
/// `scale-of-scale` already folds their chains, and lifting them multiplies the variants of
/// every Fisher expression.)
pub fn elementwise_rules() -> Vec<Rule> {
    let lift = |name: &str, pattern: &str, program: Vec<Instr>, inputs: &'static [&'static str]| {
        fusion(name, pattern, move |f, s| {
            lift_elementwise(f, s, program.clone(), inputs)
        })
    };
    let relu_mask = vec![Instr::Input(0), Instr::Input(1), Instr::ReluMask(0, 1)];
    vec![
        lift(
            "relu-as-elementwise",
            "(relu ?r ?a)",
            vec![Instr::Input(0), Instr::Relu(0)],
            &["?a"],
        ),
        lift(
            "add-as-elementwise",
            "(add ?p ?a ?b)",
            vec![Instr::Input(0), Instr::Input(1), Instr::Add(0, 1)],
            &["?a", "?b"],
        ),
        lift(
            "square-as-elementwise",
            "(square ?s ?a)",
            vec![Instr::Input(0), Instr::Square(0)],
            &["?a"],
        ),
        lift(
            "relu-backward-as-elementwise",
            "(relu_backward ?r ?a ?b)",
            relu_mask,
            &["?a", "?b"],
        ),
        Rewrite::new(
            "elementwise-chain",
            ElementwiseChains,
            Fusion(merge_elementwise),
        )
        .expect("the chain rule binds its variables"),
    ]
}

/// The update's fusions: the Fisher estimate's constant factor applied where the update
/// reads it, the estimate written from there (one launch a parameter fewer).
pub fn update_rules() -> Vec<Rule> {
    vec![fusion(
        "fisher-scale-in-update",
        "(noisy_sgd_update ?u ?t ?v ?g ?lr ?mu ?wd ?s ?seed ?step ?fisher)",
        fisher_scale_in_update,
    )]
}

fn fisher_scale_in_update(f: &mut Fuse<'_>, s: &Subst) -> Option<()> {
    let Op::NoisySgdUpdate(update) = f.attrs(s, "?u", "noisy_sgd_update")? else {
        return None;
    };
    if update.fisher_factor.is_some() {
        return None;
    }
    let fisher = s[v("?fisher")];
    let scales: Vec<ENode> = f.egraph[fisher].nodes.clone();
    for node in scales {
        let Some(Op::Scale(scale)) = Types::op_of(f.egraph, &node) else {
            continue;
        };
        let names = [
            "?t", "?v", "?g", "?lr", "?mu", "?wd", "?s", "?seed", "?step",
        ];
        let mut inputs: Vec<Id> = names.iter().map(|n| s[v(n)]).collect();
        inputs.push(node.inputs()[0]);
        let fused = NoisySgdUpdate {
            fisher_factor: Some(scale.factor),
            ..update.clone()
        };
        let Some(t) = f.add(fused, &inputs) else {
            continue;
        };
        for k in 0..2 {
            let (old, new) = (f.proj(f.matched, k), f.proj(t, k));
            f.same(old, new);
        }
        let estimate = f.proj(t, 2);
        f.same(fisher, estimate);
    }
    Some(())
}

// ---- the machinery ----

/// A fusion being applied: the e-graph, the matched class, its origin, and what changed.
struct Fuse<'a> {
    egraph: &'a mut EGraph,
    matched: Id,
    origin: Option<Origin>,
    changed: Vec<Id>,
}

impl Fuse<'_> {
    /// Adds `op` over input classes after checking its shapes; `None` if they do not fit.
    fn add(&mut self, op: impl Into<Op>, inputs: &[Id]) -> Option<Id> {
        let op = op.into();
        let types: Option<Vec<TensorType>> = inputs
            .iter()
            .map(|&i| value_type(self.egraph, i).cloned())
            .collect();
        op.infer(&types?.iter().collect::<Vec<_>>()).ok()?;
        let node = op_node(self.egraph, &op, inputs);
        let id = self.egraph.add(node);
        set_origin(self.egraph, id, &self.origin);
        Some(id)
    }

    fn proj(&mut self, tuple: Id, index: usize) -> Id {
        let id = proj(self.egraph, tuple, index);
        set_origin(self.egraph, id, &self.origin);
        id
    }

    /// Names what this fusion adds after the layer of class `id` (instead of the matched one).
    fn name_after(&mut self, id: Id) {
        if let Some(origin) = self.egraph[id].data.origin.clone() {
            self.origin = Some(origin);
        }
    }

    /// Records that `a` and `b` are the same value.
    fn same(&mut self, a: Id, b: Id) {
        if self.egraph.union(a, b) {
            self.changed.push(a);
        }
    }

    /// The op whose attributes the leaf bound to `var` holds, decoded as op `name`.
    fn attrs(&self, subst: &Subst, var: &str, name: &str) -> Option<Op> {
        let symbol = attr_symbol(self.egraph, subst[v(var)])?;
        decode(name, symbol.as_str()).ok()
    }

    /// The batch size: the leading dimension of the value bound to `var`.
    fn batch(&self, subst: &Subst, var: &str) -> Option<usize> {
        value_type(self.egraph, subst[v(var)]).map(|t| t.shape[0])
    }

    /// The batch norm's ε bound to `var` (from a batch_norm, bn_apply or reduction op).
    fn eps(&self, subst: &Subst, var: &str) -> Option<FloatAttr> {
        match self.attrs(subst, var, "bn_backward_reduce")? {
            Op::BnBackwardReduce(BnBackwardReduce { eps }) => Some(eps),
            _ => None,
        }
    }
}

fn v(name: &str) -> Var {
    name.parse().expect("variable names start with '?'")
}

/// An applier written as Rust code over a [`Fuse`]; `None` means "does not apply here".
struct Fusion<F>(F);

impl<F> Applier<ENode, Types> for Fusion<F>
where
    F: Fn(&mut Fuse<'_>, &Subst) -> Option<()> + Send + Sync,
{
    fn apply_one(
        &self,
        egraph: &mut EGraph,
        eclass: Id,
        subst: &Subst,
        _: Option<&PatternAst<ENode>>,
        _: Symbol,
    ) -> Vec<Id> {
        let origin = egraph[eclass].data.origin.clone();
        let mut fuse = Fuse {
            egraph,
            matched: eclass,
            origin,
            changed: Vec::new(),
        };
        (self.0)(&mut fuse, subst);
        fuse.changed
    }
}

/// A pattern rewrite whose right-hand side is type-checked, node by node with the ops' own
/// shape rules, before anything is added.
struct Checked(Pattern<ENode>);

impl Applier<ENode, Types> for Checked {
    fn apply_one(
        &self,
        egraph: &mut EGraph,
        eclass: Id,
        subst: &Subst,
        ast: Option<&PatternAst<ENode>>,
        rule: Symbol,
    ) -> Vec<Id> {
        if !types_check(egraph, &self.0.ast, subst) {
            return Vec::new();
        }
        self.0.apply_one(egraph, eclass, subst, ast, rule)
    }

    fn vars(&self) -> Vec<Var> {
        self.0.vars()
    }
}

/// Whether every node of the pattern, instantiated with `subst`, passes its op's shape rule.
fn types_check(egraph: &EGraph, ast: &PatternAst<ENode>, subst: &Subst) -> bool {
    let mut types: Vec<Option<Vec<TensorType>>> = Vec::new();
    let mut attrs: Vec<Option<Symbol>> = Vec::new();
    for node in ast.as_ref() {
        let (t, a) = match node {
            ENodeOrVar::Var(var) => {
                let class = subst[*var];
                (egraph[class].data.types.clone(), attr_symbol(egraph, class))
            }
            ENodeOrVar::ENode(ENode::Attr(text)) => (None, Some(*text)),
            ENodeOrVar::ENode(ENode::Op(name, children)) => {
                let child = |id: &Id| usize::from(*id);
                let Some(attr) = attrs[child(&children[0])] else {
                    return false;
                };
                let inferred = if name.as_str() == super::lang::PROJ {
                    let index: Option<usize> = attr.as_str().parse().ok();
                    let tuple = types[child(&children[1])].as_ref();
                    index
                        .zip(tuple)
                        .and_then(|(i, t)| t.get(i).map(|t| vec![t.clone()]))
                } else {
                    let inputs: Option<Vec<TensorType>> = children[1..]
                        .iter()
                        .map(|c| match types[child(c)].as_deref() {
                            Some([t]) => Some(t.clone()),
                            _ => None,
                        })
                        .collect();
                    let op = decode(name.as_str(), attr.as_str()).ok();
                    op.zip(inputs)
                        .and_then(|(op, inputs)| op.infer(&inputs.iter().collect::<Vec<_>>()).ok())
                };
                if inferred.is_none() {
                    return false;
                }
                (inferred, None)
            }
        };
        types.push(t);
        attrs.push(a);
    }
    true
}

fn checked(name: &str, lhs: &str, rhs: &str) -> Rule {
    let searcher: Pattern<ENode> = lhs.parse().expect("rule patterns parse");
    let applier: Pattern<ENode> = rhs.parse().expect("rule patterns parse");
    Rewrite::new(name, searcher, Checked(applier)).expect("rule patterns bind their variables")
}

fn fusion<F>(name: &str, pattern: &str, apply: F) -> Rule
where
    F: Fn(&mut Fuse<'_>, &Subst) -> Option<()> + Send + Sync + 'static,
{
    let searcher: Pattern<ENode> = pattern.parse().expect("rule patterns parse");
    Rewrite::new(name, searcher, Fusion(apply)).expect("rule patterns bind their variables")
}

fn scale_op(factor: f64) -> Scale {
    Scale {
        factor: FloatAttr(factor),
    }
}

fn scale_factor(f: &Fuse<'_>, subst: &Subst, var: &str) -> Option<f64> {
    match f.attrs(subst, var, "scale")? {
        Op::Scale(s) => Some(s.factor.0),
        _ => None,
    }
}

// ---- scalar rules ----

fn square_of_scale(f: &mut Fuse<'_>, s: &Subst) -> Option<()> {
    let factor = scale_factor(f, s, "?f")?;
    let squared = f.add(Square, &[s[v("?x")]])?;
    let scaled = f.add(scale_op(factor * factor), &[squared])?;
    f.same(f.matched, scaled);
    Some(())
}

fn scale_of_scale(f: &mut Fuse<'_>, s: &Subst) -> Option<()> {
    let product = scale_factor(f, s, "?f")? * scale_factor(f, s, "?g")?;
    let scaled = f.add(scale_op(product), &[s[v("?x")]])?;
    f.same(f.matched, scaled);
    Some(())
}

fn bn_squares_of_scaled_gradient(f: &mut Fuse<'_>, s: &Subst) -> Option<()> {
    let factor = scale_factor(f, s, "?f")?;
    let index: usize = attr_symbol(f.egraph, s[v("?i")])?.as_str().parse().ok()?;
    let op = f.attrs(s, "?e", "bn_param_grads_sq")?;
    let inputs = [s[v("?dy")], s[v("?x")], s[v("?m")], s[v("?v")]];
    let sums = f.add(op, &inputs)?;
    let picked = f.proj(sums, index);
    let scaled = f.add(scale_op(factor * factor), &[picked])?;
    f.same(f.matched, scaled);
    Some(())
}

// ---- gradients with their squares ----

/// `squares` (exact) are `(1/N)·Σₙ cₙ²`, a batch mean, so the fused op's sum is scaled.
fn mean_of(f: &mut Fuse<'_>, sum: Id, batch: usize) -> Option<Id> {
    f.add(scale_op(1.0 / batch as f64), &[sum])
}

fn conv_wgrad_with_squares(f: &mut Fuse<'_>, s: &Subst, squares: Squares) -> Option<()> {
    let Op::ConvWgrad(wgrad) = f.attrs(s, "?a", "conv_wgrad")? else {
        return None;
    };
    let (x, dy) = (s[v("?x")], s[v("?dy")]);
    let fused = FusedWgrad {
        wgrad: wgrad.clone(),
        prologue: None,
        squares,
    };
    let t = f.add(fused, &[x, dy])?;
    let (grad, sq) = (f.proj(t, 0), f.proj(t, 1));
    let fisher_part = match squares {
        Squares::PerExample => mean_of(f, sq, f.batch(s, "?x")?)?,
        _ => sq,
    };
    f.same(f.matched, fisher_part);
    let plain = f.add(wgrad, &[x, dy])?;
    f.same(plain, grad);
    Some(())
}

fn linear_wgrad_with_squares(f: &mut Fuse<'_>, s: &Subst, exact: bool) -> Option<()> {
    let (x, dy) = (s[v("?x")], s[v("?dy")]);
    let t = f.add(LinearWgradSq, &[x, dy])?;
    let (grad, sq) = (f.proj(t, 0), f.proj(t, 1));
    let fisher_part = if exact {
        mean_of(f, sq, f.batch(s, "?x")?)?
    } else {
        sq
    };
    f.same(f.matched, fisher_part);
    let plain = f.add(LinearWgrad, &[x, dy])?;
    f.same(plain, grad);
    Some(())
}

fn bias_grad_with_squares(f: &mut Fuse<'_>, s: &Subst, squares: Squares) -> Option<()> {
    let dy = s[v("?dy")];
    let t = f.add(ChannelSumSq { squares }, &[dy])?;
    let (grad, sq) = (f.proj(t, 0), f.proj(t, 1));
    let fisher_part = match squares {
        Squares::PerExample => mean_of(f, sq, f.batch(s, "?dy")?)?,
        _ => sq,
    };
    f.same(f.matched, fisher_part);
    let plain = f.add(ChannelSum, &[dy])?;
    f.same(plain, grad);
    Some(())
}

/// `mean(square(dy))` of a `[N, C]` gradient: per-example bias contributions are its rows.
fn row_grad_with_squares(f: &mut Fuse<'_>, s: &Subst) -> Option<()> {
    if value_type(f.egraph, s[v("?dy")])?.rank() != 2 {
        return None;
    }
    bias_grad_with_squares(f, s, Squares::PerExample)
}

fn bn_grads_with_squares(f: &mut Fuse<'_>, s: &Subst, squares: Squares) -> Option<()> {
    let index: usize = attr_symbol(f.egraph, s[v("?i")])?.as_str().parse().ok()?;
    let eps = f.eps(s, "?e")?;
    let inputs = [s[v("?dy")], s[v("?x")], s[v("?m")], s[v("?v")]];
    let t = f.add(BnBackwardReduceSq { eps, squares }, &inputs)?;
    let sq = f.proj(t, 2 + index);
    let fisher_part = match squares {
        Squares::PerExample => mean_of(f, sq, f.batch(s, "?dy")?)?,
        _ => sq,
    };
    f.same(f.matched, fisher_part);
    let plain = f.add(BnBackwardReduce { eps }, &inputs)?;
    for k in 0..2 {
        let (old, new) = (f.proj(plain, k), f.proj(t, k));
        f.same(old, new);
    }
    Some(())
}

// ---- forward fusions ----

/// For each convolution producing `?y`, the same convolution with the statistics epilogue.
fn bn_stats_in_conv_epilogue(f: &mut Fuse<'_>, s: &Subst) -> Option<()> {
    let y = s[v("?y")];
    f.name_after(y);
    let producers: Vec<ENode> = f.egraph[y].nodes.clone();
    for node in producers {
        let op = Types::op_of(f.egraph, &node);
        let fused = match op {
            Some(Op::Conv2d(conv)) => FusedConv {
                conv,
                prologue: None,
                stats: true,
            },
            Some(Op::FusedConv(c)) if !c.stats => FusedConv { stats: true, ..c },
            _ => continue,
        };
        let Some(t) = f.add(fused, node.inputs()) else {
            continue;
        };
        let conv_out = f.proj(t, 0);
        f.same(y, conv_out);
        for k in 1..3 {
            let (old, new) = (f.proj(f.matched, k), f.proj(t, k));
            f.same(old, new);
        }
    }
    Some(())
}

/// The BN-apply + ReLU prologue inputs: (y, mean, var, γ, β).
fn prologue_inputs(s: &Subst) -> Vec<Id> {
    ["?y", "?m", "?v", "?g", "?b"]
        .iter()
        .map(|n| s[v(n)])
        .collect()
}

fn bn_relu_in_conv_prologue(f: &mut Fuse<'_>, s: &Subst) -> Option<()> {
    let Op::Conv2d(conv) = f.attrs(s, "?a", "conv2d")? else {
        return None;
    };
    let mut inputs = prologue_inputs(s);
    inputs.push(s[v("?w")]);
    if conv.bias {
        inputs.push(s[v("?bias")]);
    }
    let fused = FusedConv {
        conv,
        prologue: Some(f.eps(s, "?e")?),
        stats: false,
    };
    let y = f.add(fused, &inputs)?;
    f.same(f.matched, y);
    Some(())
}

fn bn_relu_recomputed_in_wgrad(f: &mut Fuse<'_>, s: &Subst) -> Option<()> {
    let (wgrad, squares) = match f.attrs(s, "?a", "conv_wgrad") {
        Some(Op::ConvWgrad(w)) => (w, Squares::None),
        _ => match f.attrs(s, "?a", "fused_wgrad")? {
            Op::FusedWgrad(w) if w.prologue.is_none() => (w.wgrad, w.squares),
            _ => return None,
        },
    };
    let mut inputs = prologue_inputs(s);
    inputs.push(s[v("?dy")]);
    let fused = FusedWgrad {
        wgrad,
        prologue: Some(f.eps(s, "?e")?),
        squares,
    };
    let t = f.add(fused, &inputs)?;
    f.same(f.matched, t);
    Some(())
}

fn bn_relu(f: &mut Fuse<'_>, s: &Subst, residual: bool) -> Option<()> {
    let mut inputs = prologue_inputs(s);
    if residual {
        inputs.push(s[v("?s")]);
    }
    let fused = BnRelu {
        eps: f.eps(s, "?e")?,
        residual,
    };
    let y = f.add(fused, &inputs)?;
    f.same(f.matched, y);
    Some(())
}

// ---- backward fusions ----

fn dgrad_relu_backward(f: &mut Fuse<'_>, s: &Subst) -> Option<()> {
    let Op::ConvDgrad(dgrad) = f.attrs(s, "?a", "conv_dgrad")? else {
        return None;
    };
    let mut inputs = vec![s[v("?dy")], s[v("?w")]];
    let plain = f.add(dgrad.clone(), &inputs)?;
    f.name_after(plain);
    inputs.extend(prologue_inputs(s));
    let fused = FusedDgrad {
        dgrad,
        eps: f.eps(s, "?e")?,
        squares: Squares::None,
        residual: false,
    };
    let t = f.add(fused, &inputs)?;
    let dz = f.proj(t, 0);
    f.same(f.matched, dz);
    Some(())
}

fn bn_reductions_with_squares_in_producer(f: &mut Fuse<'_>, s: &Subst) -> Option<()> {
    match f.attrs(s, "?e", "bn_backward_reduce_sq")? {
        Op::BnBackwardReduceSq(r) => bn_reductions_in_producer(f, s, r.squares),
        _ => None,
    }
}

/// Moves BN reductions (and their squares) over `du` into the op that produces `du`: a ReLU
/// backward (→ relu_backward_bn_reduce, and where the ReLU's gradient is a data gradient plus
/// a residual, → a residual fused_dgrad) or a masked dgrad (→ fused_dgrad with reductions).
fn bn_reductions_in_producer(f: &mut Fuse<'_>, s: &Subst, squares: Squares) -> Option<()> {
    let eps = f.eps(s, "?e")?;
    let (du, y, m, var) = (s[v("?du")], s[v("?y")], s[v("?m")], s[v("?v")]);
    let same_class = |f: &Fuse<'_>, a: Id, b: Id| f.egraph.find(a) == f.egraph.find(b);
    let producers: Vec<ENode> = f.egraph[du].nodes.clone();
    for node in producers {
        match Types::op_of(f.egraph, &node) {
            Some(Op::ReluBackward(_)) => {
                let (g, out) = (node.inputs()[0], node.inputs()[1]);
                let inputs = [g, out, y, m, var];
                if let Some(t) = f.add(ReluBackwardBnReduce { eps, squares }, &inputs) {
                    same_reductions(f, du, t, squares);
                }
                residual_dgrads(f, (du, g, out), [y, m, var], (eps, squares));
            }
            _ if node.name() == super::lang::PROJ => {
                // proj 0 of a fused dgrad without reductions over the same batch norm
                let tuple = node.inputs()[0];
                f.name_after(tuple);
                let dgrads: Vec<ENode> = f.egraph[tuple].nodes.clone();
                let fused = dgrads.into_iter().find_map(|d| {
                    let Some(Op::FusedDgrad(fd)) = Types::op_of(f.egraph, &d) else {
                        return None;
                    };
                    let i = d.inputs();
                    let matches = fd.squares == Squares::None
                        && !fd.residual
                        && fd.eps == eps
                        && same_class(f, i[FusedDgrad::Y], y)
                        && same_class(f, i[FusedDgrad::MEAN], m)
                        && same_class(f, i[FusedDgrad::VAR], var);
                    let fused = FusedDgrad { squares, ..fd };
                    if matches { f.add(fused, i) } else { None }
                });
                if let Some(t) = fused {
                    same_reductions(f, du, t, squares);
                }
            }
            _ => {}
        }
    }
    Some(())
}

/// For `du = relu_backward(g, out)` where `g = add(conv_dgrad(dy, w), r)` (either order):
/// the data gradient with the add, the mask and the reductions over batch norm `bn` (y, mean,
/// var) in its epilogue, its dz unioned with `du`, named after the convolution.
fn residual_dgrads(
    f: &mut Fuse<'_>,
    (du, g, out): (Id, Id, Id),
    bn: [Id; 3],
    (eps, squares): (FloatAttr, Squares),
) {
    let sums: Vec<ENode> = f.egraph[g].nodes.clone();
    for sum in sums {
        if !matches!(Types::op_of(f.egraph, &sum), Some(Op::Add(_))) {
            continue;
        }
        let (a, b) = (sum.inputs()[0], sum.inputs()[1]);
        for (gradient, residual) in [(a, b), (b, a)] {
            let dgrads: Vec<ENode> = f.egraph[gradient].nodes.clone();
            for d in dgrads {
                let Some(Op::ConvDgrad(dgrad)) = Types::op_of(f.egraph, &d) else {
                    continue;
                };
                let mut inputs = d.inputs().to_vec();
                inputs.extend(bn);
                inputs.extend([residual, out]);
                let fused = FusedDgrad {
                    dgrad,
                    eps,
                    squares,
                    residual: true,
                };
                let origin = f.origin.clone();
                f.name_after(gradient);
                if let Some(t) = f.add(fused, &inputs) {
                    same_reductions(f, du, t, squares);
                }
                f.origin = origin;
            }
        }
    }
}

/// Records that tuple `t` computes `du` (its output 0) and the matched reductions (the rest).
fn same_reductions(f: &mut Fuse<'_>, du: Id, t: Id, squares: Squares) {
    let masked = f.proj(t, 0);
    f.same(du, masked);
    let outputs = 2 + 2 * squares.extra_outputs();
    for k in 0..outputs {
        let (old, new) = (f.proj(f.matched, k), f.proj(t, k + 1));
        f.same(old, new);
    }
}

// ---- elementwise chains ----

/// Most inputs and computing steps a merged elementwise program may have. The backward pass
/// is one long chain of residual adds and ReLU masks, so unbounded merging would enumerate
/// every sub-chain of it; short programs capture the fusions worth having.
const MAX_ELEMENTWISE_INPUTS: usize = 4;
const MAX_ELEMENTWISE_STEPS: usize = 3;

fn lift_elementwise(
    f: &mut Fuse<'_>,
    s: &Subst,
    program: Vec<Instr>,
    inputs: &[&str],
) -> Option<()> {
    let ids: Vec<Id> = inputs.iter().map(|n| s[v(n)]).collect();
    let node = f.add(Elementwise { program }, &ids)?;
    f.same(f.matched, node);
    Some(())
}

/// Finds elementwise nodes with an input whose class also holds an elementwise node; binds
/// `?inner` to that input's class.
struct ElementwiseChains;

impl Searcher<ENode, Types> for ElementwiseChains {
    fn search_eclass_with_limit(
        &self,
        egraph: &EGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<egg::SearchMatches<'_, ENode>> {
        let mut substs = Vec::new();
        for node in egraph[eclass]
            .nodes
            .iter()
            .filter(|n| n.name() == "elementwise")
        {
            for &input in node.inputs() {
                if substs.len() >= limit {
                    break;
                }
                if egraph[input]
                    .nodes
                    .iter()
                    .any(|n| n.name() == "elementwise")
                {
                    let mut subst = Subst::with_capacity(1);
                    subst.insert(v("?inner"), input);
                    substs.push(subst);
                }
            }
        }
        (!substs.is_empty()).then(|| egg::SearchMatches {
            eclass,
            substs,
            ast: None,
        })
    }

    fn vars(&self) -> Vec<Var> {
        vec![v("?inner")]
    }
}

/// Inlines the single-op elementwise nodes of `?inner` into every elementwise node of the
/// matched class that reads it. Inlining one op at a time keeps the number of programs per
/// class quadratic in the chain length instead of exponential.
fn merge_elementwise(f: &mut Fuse<'_>, s: &Subst) -> Option<()> {
    let inner_class = f.egraph.find(s[v("?inner")]);
    let outers: Vec<ENode> = f.egraph[f.matched].nodes.clone();
    let inners: Vec<ENode> = f.egraph[inner_class].nodes.clone();
    for outer in outers.iter().filter(|n| n.name() == "elementwise") {
        let Some(Op::Elementwise(outer_op)) = Types::op_of(f.egraph, outer) else {
            continue;
        };
        for inner in inners.iter().filter(|n| n.name() == "elementwise") {
            let Some(Op::Elementwise(inner_op)) = Types::op_of(f.egraph, inner) else {
                continue;
            };
            if inner_op.program.len() != inner.inputs().len() + 1 {
                continue;
            }
            let canonical =
                |ids: &[Id], g: &EGraph| ids.iter().map(|&i| g.find(i)).collect::<Vec<_>>();
            let outer_inputs = canonical(outer.inputs(), f.egraph);
            let inner_inputs = canonical(inner.inputs(), f.egraph);
            if !outer_inputs.contains(&inner_class) {
                continue;
            }
            let Some((program, inputs)) = inline_program(
                &outer_op,
                &outer_inputs,
                &inner_op,
                &inner_inputs,
                inner_class,
            ) else {
                continue;
            };
            if let Some(merged) = f.add(Elementwise { program }, &inputs) {
                f.same(f.matched, merged);
            }
        }
    }
    Some(())
}

/// The outer program with every read of `inner_class` replaced by the inner program. Returns
/// the merged program and its inputs, or `None` if it would exceed the size limits.
fn inline_program(
    outer: &Elementwise,
    outer_inputs: &[Id],
    inner: &Elementwise,
    inner_inputs: &[Id],
    inner_class: Id,
) -> Option<(Vec<Instr>, Vec<Id>)> {
    let mut inputs: Vec<Id> = outer_inputs
        .iter()
        .copied()
        .filter(|&i| i != inner_class)
        .collect();
    for &i in inner_inputs {
        if !inputs.contains(&i) {
            inputs.push(i);
        }
    }
    let steps = |p: &Elementwise| {
        p.program
            .iter()
            .filter(|i| !matches!(i, Instr::Input(_)))
            .count()
    };
    if inputs.len() > MAX_ELEMENTWISE_INPUTS || steps(outer) + steps(inner) > MAX_ELEMENTWISE_STEPS
    {
        return None;
    }
    let position = |id: Id| {
        inputs
            .iter()
            .position(|&i| i == id)
            .expect("collected above")
    };
    let mut program: Vec<Instr> = (0..inputs.len()).map(Instr::Input).collect();
    // inner steps after the shared inputs
    let mut inner_map = Vec::with_capacity(inner.program.len());
    for instr in &inner.program {
        let mapped = match instr {
            Instr::Input(i) => {
                inner_map.push(position(inner_inputs[*i]));
                continue;
            }
            other => other.with_operands(|o| inner_map[o]),
        };
        inner_map.push(program.len());
        program.push(mapped);
    }
    let inner_result = *inner_map.last()?;
    let mut outer_map = Vec::with_capacity(outer.program.len());
    for instr in &outer.program {
        let mapped = match instr {
            Instr::Input(i) if outer_inputs[*i] == inner_class => {
                outer_map.push(inner_result);
                continue;
            }
            Instr::Input(i) => {
                outer_map.push(position(outer_inputs[*i]));
                continue;
            }
            other => other.with_operands(|o| outer_map[o]),
        };
        outer_map.push(program.len());
        program.push(mapped);
    }
    let result = *outer_map.last()?;
    Some(canonical_program(&program, result, &inputs))
}

/// The program reduced to the steps `result` depends on, each computed once, reading only the
/// inputs it uses: equal chains become equal programs, so the e-graph shares them.
fn canonical_program(program: &[Instr], result: usize, inputs: &[Id]) -> (Vec<Instr>, Vec<Id>) {
    // which steps the result needs
    let mut needed = vec![false; program.len()];
    needed[result] = true;
    for k in (0..=result).rev() {
        if needed[k] {
            for operand in program[k].operands() {
                needed[operand] = true;
            }
        }
    }
    let mut kept_inputs = Vec::new();
    let mut steps: Vec<Instr> = Vec::new();
    let mut map = vec![usize::MAX; program.len()];
    for (k, instr) in program.iter().enumerate().filter(|(k, _)| needed[*k]) {
        let step = match *instr {
            Instr::Input(i) => {
                let slot = kept_inputs
                    .iter()
                    .position(|&x| x == inputs[i])
                    .unwrap_or_else(|| {
                        kept_inputs.push(inputs[i]);
                        kept_inputs.len() - 1
                    });
                Instr::Input(slot)
            }
            ref other => other.with_operands(|o| map[o]),
        };
        // the same step computed before: reuse it
        map[k] = steps.iter().position(|s| *s == step).unwrap_or_else(|| {
            steps.push(step);
            steps.len() - 1
        });
    }
    // inputs first, in slot order, as every program starts
    let mut ordered: Vec<Instr> = (0..kept_inputs.len()).map(Instr::Input).collect();
    let mut renumber: Vec<usize> = Vec::with_capacity(steps.len());
    for step in &steps {
        match step {
            Instr::Input(slot) => renumber.push(*slot),
            other => {
                renumber.push(ordered.len());
                ordered.push(other.with_operands(|o| renumber[o]));
            }
        }
    }
    // the result is the last step
    let last = renumber[map[result]];
    if last != ordered.len() - 1 {
        ordered.push(Instr::Scale(last, FloatAttr(1.0)));
    }
    (ordered, kept_inputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::Graph;
    use crate::ops::{Input, Relu, Role};

    /// x [2, 3, 4, 4] → relu.
    fn relu_graph() -> Graph {
        let mut g = Graph::new();
        let ty = TensorType::f32(&[2, 3, 4, 4]);
        let x = g
            .add1(
                Input {
                    role: Role::Named("x".into()),
                    ty,
                },
                "x",
                &[],
            )
            .unwrap();
        let y = g.add1(Relu, "relu", &[x]).unwrap();
        g.set_output(crate::graph::Output::Named("y".into()), y);
        g
    }

    fn run(rule: Rule) -> EGraph {
        let loaded = super::super::convert::load(&relu_graph());
        egg::Runner::default()
            .with_egraph(loaded.egraph)
            .run(&[rule])
            .egraph
    }

    fn has(egraph: &EGraph, name: &str) -> bool {
        egraph
            .classes()
            .any(|c| c.nodes.iter().any(|n| n.name() == name))
    }

    #[test]
    fn a_pattern_rewrite_with_an_ill_typed_right_side_adds_nothing() {
        // a linear weight gradient needs rank-2 inputs; the relu's are rank 4
        let egraph = run(checked("bad", "(relu ?r ?x)", "(linear_wgrad ?r ?x ?x)"));
        assert!(!has(&egraph, "linear_wgrad"));
        assert_eq!(egraph.analysis.conflicts, 0);
        // a well-typed one is added: relu(relu(x)) = relu(x) puts a second relu node in
        let egraph = run(checked("good", "(relu ?r ?x)", "(relu ?r (relu ?r ?x))"));
        let relus = egraph
            .classes()
            .flat_map(|c| &c.nodes)
            .filter(|n| n.name() == "relu")
            .count();
        assert_eq!(relus, 2);
    }

    #[test]
    fn a_fusion_whose_op_does_not_type_check_adds_nothing() {
        let egraph = run(fusion("bad", "(relu ?r ?x)", |f, s| {
            let grad = f.add(LinearWgrad, &[s[v("?x")], s[v("?x")]])?;
            f.same(f.matched, grad);
            Some(())
        }));
        assert!(!has(&egraph, "linear_wgrad"));
    }
}
