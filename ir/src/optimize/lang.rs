//! The IR as an egg language, and the analysis that types every e-class.
//!
//! One e-node kind per IR op, named by the op's name. Its first child is an *attribute leaf*:
//! the op's attributes as canonical JSON (so rules can bind them, carry them over to a fused
//! op, or decode and inspect them); the op's inputs follow. Multi-output ops are tuples: their
//! consumers read `(proj <index> tuple)`. One `root` node collects the graph's outputs.
//!
//! The analysis gives every e-class the output types of its nodes (one type for a value, one
//! per output for a tuple), computed by the ops' own shape rules, and the layer and phase it
//! came from (for reports and the rebuilt graph's node names).

use std::collections::HashMap;
use std::fmt;

use egg::{Analysis, DidMerge, FromOp, Id, Language, Symbol};

use crate::graph::Phase;
use crate::ops::Op;
use crate::tensor::TensorType;

/// Node names that are not IR ops.
pub const PROJ: &str = "proj";
pub const ROOT: &str = "root";

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ENode {
    /// An op, `proj` or `root`: its name, then the attribute leaf, then the inputs.
    Op(Symbol, Vec<Id>),
    /// An attribute leaf: an op's attributes as JSON, or a projection index.
    Attr(Symbol),
}

impl ENode {
    pub fn name(&self) -> &'static str {
        match self {
            ENode::Op(name, _) | ENode::Attr(name) => name.as_str(),
        }
    }

    /// The inputs (for an op: every child after the attribute leaf).
    pub fn inputs(&self) -> &[Id] {
        match self {
            ENode::Op(_, children) => &children[1..],
            ENode::Attr(_) => &[],
        }
    }

    pub fn attr_leaf(&self) -> Option<Id> {
        match self {
            ENode::Op(_, children) => children.first().copied(),
            ENode::Attr(_) => None,
        }
    }
}

impl Language for ENode {
    type Discriminant = (Symbol, usize);

    fn discriminant(&self) -> Self::Discriminant {
        match self {
            ENode::Op(name, children) => (*name, children.len()),
            ENode::Attr(value) => (*value, usize::MAX),
        }
    }

    fn matches(&self, other: &Self) -> bool {
        self.discriminant() == other.discriminant()
    }

    fn children(&self) -> &[Id] {
        match self {
            ENode::Op(_, children) => children,
            ENode::Attr(_) => &[],
        }
    }

    fn children_mut(&mut self) -> &mut [Id] {
        match self {
            ENode::Op(_, children) => children,
            ENode::Attr(_) => &mut [],
        }
    }
}

impl fmt::Display for ENode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromOp for ENode {
    type Error = std::convert::Infallible;

    /// Patterns: a bare word is an attribute leaf (e.g. the `0` of `(proj 0 ?t)`).
    fn from_op(op: &str, children: Vec<Id>) -> Result<Self, Self::Error> {
        Ok(if children.is_empty() {
            ENode::Attr(op.into())
        } else {
            ENode::Op(op.into(), children)
        })
    }
}

/// An op's name and its attributes as canonical JSON.
pub fn encode(op: &Op) -> (Symbol, Symbol) {
    match serde_json::to_value(op) {
        Ok(serde_json::Value::Object(map)) if map.len() == 1 => {
            let (name, attrs) = map.into_iter().next().expect("one entry");
            (name.as_str().into(), attrs.to_string().as_str().into())
        }
        other => unreachable!("ops serialise as {{name: attributes}}, got {other:?}"),
    }
}

/// An attribute leaf that is no op's attributes.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode op '{name}' from {attrs}: {error}")]
pub struct DecodeError {
    pub name: String,
    pub attrs: String,
    pub error: serde_json::Error,
}

/// The op with this name and attribute JSON.
pub fn decode(name: &str, attrs: &str) -> Result<Op, DecodeError> {
    serde_json::from_str(&format!("{{\"{name}\":{attrs}}}")).map_err(|error| DecodeError {
        name: name.to_string(),
        attrs: attrs.to_string(),
        error,
    })
}

/// Where an e-class came from: the layer and phase of the IR node (or rule match) behind it.
#[derive(Clone, Debug, PartialEq)]
pub struct Origin {
    pub layer: String,
    pub phase: Phase,
}

#[derive(Clone, Debug, Default)]
pub struct Data {
    /// Output types: one for a value, one per output for a tuple; `None` for attribute leaves
    /// and the root.
    pub types: Option<Vec<TensorType>>,
    pub origin: Option<Origin>,
}

/// The shape-and-dtype analysis.
#[derive(Default)]
pub struct Types {
    decoded: HashMap<(Symbol, Symbol), Op>,
    /// Unions of classes whose types differ: a rule that is not an equality. Must stay 0.
    pub conflicts: usize,
}

pub type EGraph = egg::EGraph<ENode, Types>;

impl Types {
    /// The op behind an e-node, or `None` for attribute leaves, `proj` and `root`. Every node
    /// added to the e-graph was decoded once by `make`, so this is a cache lookup.
    pub fn op_of(egraph: &EGraph, node: &ENode) -> Option<Op> {
        let key = op_key(egraph, node)?;
        match egraph.analysis.decoded.get(&key) {
            Some(op) => Some(op.clone()),
            None => decode(key.0.as_str(), key.1.as_str()).ok(),
        }
    }

    fn decode_and_cache(egraph: &mut EGraph, node: &ENode) -> Option<Op> {
        let key = op_key(egraph, node)?;
        if let Some(op) = egraph.analysis.decoded.get(&key) {
            return Some(op.clone());
        }
        let op = decode(key.0.as_str(), key.1.as_str()).ok()?;
        egraph.analysis.decoded.insert(key, op.clone());
        Some(op)
    }
}

/// (name, attribute JSON) of an op node.
fn op_key(egraph: &EGraph, node: &ENode) -> Option<(Symbol, Symbol)> {
    let ENode::Op(name, children) = node else {
        return None;
    };
    if name.as_str() == PROJ || name.as_str() == ROOT {
        return None;
    }
    Some((*name, attr_symbol(egraph, children[0])?))
}

/// The attribute JSON held by an attribute-leaf class.
pub fn attr_symbol(egraph: &EGraph, leaf: Id) -> Option<Symbol> {
    egraph[leaf].nodes.iter().find_map(|n| match n {
        ENode::Attr(s) => Some(*s),
        ENode::Op(..) => None,
    })
}

/// The single type of a value class.
pub fn value_type(egraph: &EGraph, id: Id) -> Option<&TensorType> {
    match egraph[id].data.types.as_deref() {
        Some([t]) => Some(t),
        _ => None,
    }
}

impl Analysis<ENode> for Types {
    type Data = Data;

    fn make(egraph: &mut EGraph, enode: &ENode, _id: Id) -> Data {
        let types = match enode {
            ENode::Attr(_) => None,
            ENode::Op(name, children) if name.as_str() == PROJ => (|| {
                let index: usize = attr_symbol(egraph, children[0])?.as_str().parse().ok()?;
                let tuple = egraph[children[1]].data.types.as_ref()?;
                tuple.get(index).map(|t| vec![t.clone()])
            })(),
            ENode::Op(name, _) if name.as_str() == ROOT => None,
            ENode::Op(..) => (|| {
                let op = Types::decode_and_cache(egraph, enode)?;
                let inputs: Option<Vec<TensorType>> = enode
                    .inputs()
                    .iter()
                    .map(|&c| value_type(egraph, c).cloned())
                    .collect();
                let inputs = inputs?;
                op.infer(&inputs.iter().collect::<Vec<_>>()).ok()
            })(),
        };
        Data {
            types,
            origin: None,
        }
    }

    fn merge(&mut self, a: &mut Data, b: Data) -> DidMerge {
        let mut changed_a = false;
        match (&a.types, b.types) {
            (None, Some(t)) => {
                a.types = Some(t);
                changed_a = true;
            }
            (Some(x), Some(y)) if *x != y => self.conflicts += 1,
            _ => {}
        }
        if a.origin.is_none() && b.origin.is_some() {
            a.origin = b.origin;
            changed_a = true;
        }
        DidMerge(changed_a, true)
    }
}
