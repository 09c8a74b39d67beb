//! What other layers ask about an op without naming it: its [`OpClass`] (which lowering takes
//! it, whether it is a kernel, whether its FLOPs are matrix products) and its [`Rounding`]
//! (how far two backends' results may drift apart). Each op states both in its `OpDef`.

/// The family an op belongs to: ops of one class are lowered by one file of `codegen/src/lower`
/// and cost alike in the optimizer's model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpClass {
    /// A graph input, fed by the host.
    Source,
    /// A constant the memory plan fills in once.
    Constant,
    /// A view of its input's buffer (a reshape): no kernel.
    View,
    /// One output element from a few input elements (and broadcasts, shortcuts, batch means).
    Elementwise,
    /// Pooling windows and their gradients.
    Pool,
    /// Sums over the batch and the positions of a channel.
    Reduce,
    /// Batch normalisation: statistics, apply, running update, backward and Fisher.
    Norm,
    /// Convolutions and their gradients: implicit GEMMs.
    Conv,
    /// Linear layers and their gradients: matrix products.
    Linear,
    /// The loss, its gradient and its samples.
    Loss,
    /// The parameter update.
    Update,
    /// K-FAC's Kronecker factors and the noise their Cholesky factors shape.
    Kfac,
}

impl OpClass {
    /// Whether the op runs as a kernel: inputs and constants are data, a view is a reshape.
    pub fn is_kernel(self) -> bool {
        !matches!(self, OpClass::Source | OpClass::Constant | OpClass::View)
    }

    /// Whether the op's FLOPs are matrix products (convolutions, linear layers): what a
    /// tensor core can run.
    pub fn is_matrix_product(self) -> bool {
        matches!(self, OpClass::Conv | OpClass::Linear)
    }
}

/// How an op's outputs are rounded, which bounds how far two correct backends may differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rounding {
    /// Each output comes from a few inputs (elementwise, pooling windows, the update): every
    /// backend rounds the same few operations.
    FewTerms,
    /// Each output sums many terms (products, reductions, statistics, losses): its rounding
    /// depends on the order of summation, which differs between backends.
    ManyTerms,
}
