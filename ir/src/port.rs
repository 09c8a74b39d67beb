//! [`PortRef`]: one output of one graph node, the value an edge carries. Its own module so that
//! the ops' rules can name values without depending on the graph that holds them.

use petgraph::graph::NodeIndex;

/// One output of one node: the value an edge carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortRef {
    pub node: NodeIndex,
    pub port: usize,
}

impl PortRef {
    pub fn new(node: NodeIndex, port: usize) -> Self {
        PortRef { node, port }
    }
}
