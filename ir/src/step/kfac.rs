//! K-FAC in the training step: which layers take it (every convolution and linear layer, by
//! the parameters they read), and per layer the nodes of its batch factors (outputs the
//! runtime averages and decomposes) and of its noise (from the Cholesky factors it feeds).

use std::collections::HashMap;

use petgraph::graph::NodeIndex;

use super::{forward_readers, input};
use crate::autodiff::Gradients;
use crate::error::ShapeError;
use crate::graph::{Graph, Output, PortRef};
use crate::model::Network;
use crate::ops::{Hyper, KfacGradFactor, KfacInputFactor, KfacNoise, Op, OpDef, Role};
use crate::tensor::TensorType;

/// A layer whose parameters take K-FAC noise: its weight (parameter index), its bias if any,
/// the node that reads them, and how its input factor reads its input.
#[derive(Clone, Debug)]
pub struct KfacLayer {
    pub weight: usize,
    pub bias: Option<usize>,
    pub node: NodeIndex,
    pub factor: KfacInputFactor,
}

/// The layers of `network` that K-FAC covers, in parameter order: each convolution and
/// linear layer (the forward node reading a parameter at port 1, and at port 2 its bias).
pub fn layers(graph: &Graph, network: &Network) -> Vec<KfacLayer> {
    let mut by_node: HashMap<NodeIndex, usize> = HashMap::new();
    let mut layers: Vec<KfacLayer> = Vec::new();
    for (i, param) in network.params.iter().enumerate() {
        for (node, port) in forward_readers(graph, PortRef::new(param.node, 0)) {
            let factor = match &graph.node(node).op {
                Op::Conv2d(c) => KfacInputFactor {
                    kernel: (param.shape[2], param.shape[3]),
                    stride: c.stride,
                    padding: c.padding,
                    bias: c.bias,
                },
                Op::Linear(l) => KfacInputFactor::linear(l.bias),
                _ => continue,
            };
            match (port, by_node.get(&node)) {
                (1, None) => {
                    by_node.insert(node, layers.len());
                    layers.push(KfacLayer {
                        weight: i,
                        bias: None,
                        node,
                        factor,
                    });
                }
                (2, Some(&at)) => layers[at].bias = Some(i),
                _ => {}
            }
        }
    }
    layers
}

/// Every K-FAC layer's factor and noise nodes; per parameter, its noise vector where a layer
/// covers it. The factors' `refresh` and the Cholesky factors are the step's inputs
/// ([`Role::KfacRefresh`], [`Role::KfacInputCholesky`], [`Role::KfacGradCholesky`]), the
/// factors its outputs ([`Output::KfacInputFactor`], [`Output::KfacGradFactor`]).
pub fn add_noise(
    graph: &mut Graph,
    (network, layers): (&Network, &[KfacLayer]),
    grads: &Gradients,
    hyper: &HashMap<Hyper, PortRef>,
) -> Result<Vec<Option<PortRef>>, ShapeError> {
    let refresh = input(graph, Role::KfacRefresh, TensorType::f32(&[]), "kfac");
    let mut noise = vec![None; network.params.len()];
    for layer in layers {
        let weight = &network.params[layer.weight];
        let name = weight.layer.clone();
        let x = graph.inputs(layer.node)[0];
        let y = PortRef::new(layer.node, 0);
        let dy = grads.of(y).ok_or_else(|| ShapeError {
            layer: name.clone(),
            op: KfacGradFactor::NAME,
            message: "no gradient reaches the layer's output".to_string(),
        })?;
        let a = graph.add1(layer.factor.clone(), &name, &[x, refresh])?;
        let g = graph.add1(KfacGradFactor, &name, &[dy, refresh])?;
        graph.set_output(Output::KfacInputFactor(layer.weight), a);
        graph.set_output(Output::KfacGradFactor(layer.weight), g);
        let (a_side, g_side) = (graph.ty(a).shape.clone(), graph.ty(g).shape.clone());
        let l_a = input(
            graph,
            Role::KfacInputCholesky(layer.weight),
            TensorType::f32(&a_side),
            &name,
        );
        let l_g = input(
            graph,
            Role::KfacGradCholesky(layer.weight),
            TensorType::f32(&g_side),
            &name,
        );
        let op = KfacNoise {
            weight: layer.weight as u32,
            bias: layer.bias.map(|b| b as u32),
            positions: graph.ty(y).shape[2..].iter().product(),
            weight_shape: weight.shape.clone(),
        };
        let seeds = [hyper[&Hyper::Seed], hyper[&Hyper::Step]];
        let node = graph.add(op, &name, &[l_a, l_g, seeds[0], seeds[1]])?;
        noise[layer.weight] = Some(PortRef::new(node, 0));
        if let Some(b) = layer.bias {
            noise[b] = Some(PortRef::new(node, 1));
        }
    }
    Ok(noise)
}
