//! Instantiating a [`ModelSpec`] for a batch size: expands blocks and repeats, resolves `$name`
//! variables, creates the parameter inputs and builds the forward graph. Every error names the
//! file, the line of the entry and the layer.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use petgraph::graph::NodeIndex;
use serde::Serialize;

use super::spec::{Entry, ModelSpec, Shortcut};
use crate::error::{ModelError, ShapeError, UnknownName};
use crate::graph::{Graph, Output, Phase, PortRef};
use crate::ops::{
    Add, BatchNorm, BnApply, Conv2d, FloatAttr, GlobalAvgPool, Input, Linear, MaxPool, Op, Relu,
    Reshape, Role, ShortcutA,
};
use crate::tensor::TensorType;

/// Batch norm in training mode (batch statistics) or evaluation mode (running statistics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Train,
    Eval,
}

/// How to instantiate a model.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub batch: usize,
    /// Overrides the file's input shape (channels, height, width).
    pub input: Option<[usize; 3]>,
    /// Overrides the file's residual shortcut option.
    pub shortcut: Option<Shortcut>,
    pub mode: Mode,
}

impl BuildOptions {
    pub fn train(batch: usize) -> Self {
        BuildOptions {
            batch,
            input: None,
            shortcut: None,
            mode: Mode::Train,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    ConvWeight,
    ConvBias,
    LinearWeight,
    LinearBias,
    BnGamma,
    BnBeta,
}

impl ParamKind {
    pub fn is_batch_norm(self) -> bool {
        matches!(self, ParamKind::BnGamma | ParamKind::BnBeta)
    }
}

/// A trainable parameter: an input of the graph with role `Param(index)`.
#[derive(Clone, Debug, Serialize)]
pub struct Param {
    /// e.g. `basic3.conv1.weight`.
    pub name: String,
    pub layer: String,
    pub kind: ParamKind,
    pub shape: Vec<usize>,
    #[serde(skip)]
    pub node: NodeIndex,
}

impl Param {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A batch-norm layer, whose running statistics the training step updates.
#[derive(Clone, Debug, Serialize)]
pub struct BnLayer {
    pub name: String,
    pub channels: usize,
    pub eps: f64,
    pub momentum: f64,
    /// Elements per channel in a batch (N·H·W).
    pub count: usize,
    /// The `batch_norm` node (training) or `bn_apply` node (evaluation).
    #[serde(skip)]
    pub node: NodeIndex,
}

/// One row of the layer table `fisherc inspect` prints.
#[derive(Clone, Debug, Serialize)]
pub struct LayerInfo {
    pub name: String,
    pub op: String,
    pub output: Vec<usize>,
    pub params: usize,
    pub line: usize,
}

/// A model instantiated at a batch size: the forward graph and what it is made of.
#[derive(Clone, Debug)]
pub struct Network {
    pub name: String,
    pub description: Option<String>,
    pub path: PathBuf,
    pub batch: usize,
    pub input: [usize; 3],
    pub classes: usize,
    pub mode: Mode,
    pub shortcut: Option<Shortcut>,
    /// Inputs: images, parameters (and running statistics in evaluation mode); output: logits.
    pub graph: Graph,
    pub images: PortRef,
    pub logits: PortRef,
    pub params: Vec<Param>,
    pub bn_layers: Vec<BnLayer>,
    pub layers: Vec<LayerInfo>,
}

impl Network {
    pub fn param_count(&self) -> usize {
        self.params.iter().map(Param::numel).sum()
    }
}

/// Builds the forward graph of `spec` for the given options.
pub fn build(spec: &ModelSpec, options: &BuildOptions) -> Result<Network, ModelError> {
    let input = options.input.unwrap_or(spec.input);
    let mut builder = Builder {
        spec,
        mode: options.mode,
        shortcut: options.shortcut.or(spec.shortcut),
        graph: Graph::new(),
        params: Vec::new(),
        bn_layers: Vec::new(),
        layers: Vec::new(),
    };
    builder.graph.set_phase(Phase::Forward);
    let image_type = TensorType::f32(&[options.batch, input[0], input[1], input[2]]);
    let images = builder
        .input(Role::Images, image_type, "images")
        .map_err(|e| builder.error(1, &[], format!("batch {}: {e}", options.batch)))?;
    let mut scope = Scope {
        prefix: String::new(),
        input: images,
        named: HashMap::new(),
        taken: HashSet::new(),
        counters: HashMap::new(),
        env: HashMap::from([("classes".to_string(), spec.classes as i64)]),
    };
    let logits = builder.entries(&spec.layers, &mut scope, images, &mut Vec::new())?;

    let expected = TensorType::f32(&[options.batch, spec.classes]);
    if builder.graph.ty(logits) != &expected {
        let line = spec.layers.last().map_or(1, |e| e.line);
        return Err(builder.error(
            line,
            &[],
            format!(
                "the model's output is {}, but the loss needs {expected} ([batch, classes]); \
                 end with avgpool or flatten and a linear layer with out = $classes",
                builder.graph.ty(logits)
            ),
        ));
    }
    builder.graph.set_output(Output::Logits, logits);
    Ok(Network {
        name: spec.name.clone(),
        description: spec.description.clone(),
        path: spec.path.clone(),
        batch: options.batch,
        input,
        classes: spec.classes,
        mode: options.mode,
        shortcut: builder.shortcut,
        graph: builder.graph,
        images,
        logits,
        params: builder.params,
        bn_layers: builder.bn_layers,
        layers: builder.layers,
    })
}

/// Where an entry is being expanded: each block use on the way, for error messages.
struct Site {
    block: String,
    line: usize,
}

/// Names and variables visible to the entries of one layer list.
struct Scope {
    /// Prepended to local names: `basic3.` inside the third `basic` block.
    prefix: String,
    /// The value `from = "input"` refers to.
    input: PortRef,
    named: HashMap<String, PortRef>,
    /// Every name given out here, shortcuts included.
    taken: HashSet<String>,
    counters: HashMap<String, usize>,
    env: HashMap<String, i64>,
}

impl Scope {
    /// The next local name for a layer of kind `base` (or the explicit name); names are
    /// unique within a scope.
    fn local_name(
        &mut self,
        base: &str,
        explicit: Option<&str>,
        repeat: usize,
    ) -> Result<String, String> {
        let count = self
            .counters
            .entry(explicit.unwrap_or(base).to_string())
            .or_insert(0);
        *count += 1;
        let name = match explicit {
            Some(name) if repeat == 1 => name.to_string(),
            Some(name) => format!("{name}{count}"),
            None => format!("{base}{count}"),
        };
        if !self.taken.insert(name.clone()) {
            return Err(format!("the layer name '{name}' is used twice here"));
        }
        Ok(name)
    }
}

/// Keys every entry may have.
const COMMON_KEYS: &[&str] = &["op", "block", "name", "repeat"];

/// Layer ops a model file can use, with their own keys.
const OPS: &[(&str, &[&str])] = &[
    ("conv", &["out", "kernel", "stride", "padding", "bias"]),
    ("bn", &["eps", "momentum"]),
    ("relu", &[]),
    ("maxpool", &["kernel", "stride"]),
    ("avgpool", &[]),
    ("flatten", &[]),
    ("linear", &["out", "bias"]),
    ("add", &["from", "shortcut"]),
];

/// Most copies one entry makes (`repeat`).
const MAX_REPEAT: usize = 10_000;

/// Most nodes a model's forward graph may have: far beyond any CNN trained with fisherc (VGG16
/// has 60), small enough that building one stays fast.
const MAX_MODEL_NODES: usize = 50_000;

struct Builder<'s> {
    spec: &'s ModelSpec,
    mode: Mode,
    shortcut: Option<Shortcut>,
    graph: Graph,
    params: Vec<Param>,
    bn_layers: Vec<BnLayer>,
    layers: Vec<LayerInfo>,
}

/// An entry being expanded, with the block uses that enclose it (for error messages).
struct At<'a> {
    entry: &'a Entry,
    sites: &'a [Site],
}

impl Builder<'_> {
    fn error(&self, line: usize, sites: &[Site], message: String) -> ModelError {
        let mut message = message;
        for site in sites.iter().rev() {
            message.push_str(&format!(
                " (in block '{}' used at line {})",
                site.block, site.line
            ));
        }
        ModelError {
            file: self.spec.path.clone(),
            line,
            message,
        }
    }

    fn at_error(&self, at: &At<'_>, message: String) -> ModelError {
        self.error(at.entry.line, at.sites, message)
    }

    fn shape_error(&self, at: &At<'_>, e: ShapeError) -> ModelError {
        self.at_error(at, e.to_string())
    }

    /// An input node; fails only for absurd sizes.
    fn input(&mut self, role: Role, ty: TensorType, layer: &str) -> Result<PortRef, ShapeError> {
        self.graph.add1(Input { role, ty }, layer, &[])
    }

    fn param(
        &mut self,
        at: &At<'_>,
        layer: &str,
        suffix: &str,
        kind: ParamKind,
        shape: Vec<usize>,
    ) -> Result<PortRef, ModelError> {
        let index = self.params.len();
        let value = self
            .input(Role::Param(index), TensorType::f32(&shape), layer)
            .map_err(|e| self.shape_error(at, e))?;
        self.params.push(Param {
            name: format!("{layer}.{suffix}"),
            layer: layer.to_string(),
            kind,
            shape,
            node: value.node,
        });
        Ok(value)
    }

    fn add_node(
        &mut self,
        at: &At<'_>,
        op: impl Into<Op>,
        layer: &str,
        inputs: &[PortRef],
    ) -> Result<PortRef, ModelError> {
        self.graph
            .add1(op, layer, inputs)
            .map_err(|e| self.shape_error(at, e))
    }

    fn record(&mut self, name: &str, op: &str, value: PortRef, params: usize, line: usize) {
        self.layers.push(LayerInfo {
            name: name.to_string(),
            op: op.to_string(),
            output: self.graph.ty(value).shape.clone(),
            params,
            line,
        });
    }

    fn entries(
        &mut self,
        entries: &[Entry],
        scope: &mut Scope,
        mut x: PortRef,
        sites: &mut Vec<Site>,
    ) -> Result<PortRef, ModelError> {
        for entry in entries {
            x = self.entry(entry, scope, x, sites)?;
        }
        Ok(x)
    }

    /// An error if the graph has grown past [`MAX_MODEL_NODES`].
    fn within_size(&self, at: &At<'_>) -> Result<(), ModelError> {
        if self.graph.node_count() > MAX_MODEL_NODES {
            return Err(self.at_error(
                at,
                format!("the model has grown past {MAX_MODEL_NODES} nodes here: repeat counts too large?"),
            ));
        }
        Ok(())
    }

    fn entry(
        &mut self,
        entry: &Entry,
        scope: &mut Scope,
        mut x: PortRef,
        sites: &mut Vec<Site>,
    ) -> Result<PortRef, ModelError> {
        let at = At { entry, sites };
        let repeat = self.int(&at, scope, "repeat")?.unwrap_or(1);
        if repeat == 0 || repeat > MAX_REPEAT {
            return Err(self.at_error(&at, format!("repeat is {repeat}: 1 to {MAX_REPEAT}")));
        }
        let name = self.string(&at, "name")?;
        match (self.string(&at, "op")?, self.string(&at, "block")?) {
            (Some(op), None) => {
                for _ in 0..repeat {
                    let at = At { entry, sites };
                    self.within_size(&at)?;
                    let local = scope
                        .local_name(&op, name.as_deref(), repeat)
                        .map_err(|m| self.at_error(&at, m))?;
                    x = self.layer(&at, &op, &local, scope, x)?;
                    scope.named.insert(local, x);
                }
            }
            (None, Some(block)) => {
                for _ in 0..repeat {
                    self.within_size(&At { entry, sites })?;
                    let local = scope
                        .local_name(&block, name.as_deref(), repeat)
                        .map_err(|m| self.error(entry.line, sites, m))?;
                    x = self.block(entry, &block, &local, scope, x, sites)?;
                    scope.named.insert(local, x);
                }
            }
            (Some(_), Some(_)) => {
                return Err(
                    self.at_error(&at, "an entry has 'op' or 'block', not both".to_string())
                );
            }
            (None, None) => {
                let ops: Vec<&str> = OPS.iter().map(|(op, _)| *op).collect();
                return Err(self.at_error(
                    &at,
                    format!("an entry needs 'op' (one of {}) or 'block'", ops.join(", ")),
                ));
            }
        }
        Ok(x)
    }

    /// Checks that every key of the entry belongs to `allowed` or the common keys.
    fn check_keys(&self, at: &At<'_>, what: &str, allowed: &[&str]) -> Result<(), ModelError> {
        for key in at.entry.table.keys() {
            if !allowed.contains(&key.as_str()) && !COMMON_KEYS.contains(&key.as_str()) {
                let mut known: Vec<&str> = allowed.to_vec();
                known.extend(["name", "repeat"]);
                return Err(self.at_error(
                    at,
                    format!(
                        "unknown key '{key}' for {what} (known: {})",
                        known.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn string(&self, at: &At<'_>, key: &str) -> Result<Option<String>, ModelError> {
        match at.entry.table.get(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => {
                Err(self.at_error(at, format!("'{key}' must be a string, found {other}")))
            }
        }
    }

    /// A non-negative integer, written literally or as `"$variable"`.
    fn int(&self, at: &At<'_>, scope: &Scope, key: &str) -> Result<Option<usize>, ModelError> {
        let Some(value) = at.entry.table.get(key) else {
            return Ok(None);
        };
        let n = resolve_int(value, &scope.env)
            .map_err(|m| self.at_error(at, format!("'{key}': {m}")))?;
        Ok(Some(n))
    }

    fn required_int(
        &self,
        at: &At<'_>,
        scope: &Scope,
        op: &str,
        key: &str,
    ) -> Result<usize, ModelError> {
        let n = self
            .int(at, scope, key)?
            .ok_or_else(|| self.at_error(at, format!("op '{op}' needs '{key}'")))?;
        if n == 0 {
            return Err(self.at_error(at, format!("'{key}' must be at least 1")));
        }
        Ok(n)
    }

    fn bool(&self, at: &At<'_>, key: &str, default: bool) -> Result<bool, ModelError> {
        match at.entry.table.get(key) {
            None => Ok(default),
            Some(toml::Value::Boolean(b)) => Ok(*b),
            Some(other) => {
                Err(self.at_error(at, format!("'{key}' must be true or false, found {other}")))
            }
        }
    }

    fn float(&self, at: &At<'_>, key: &str, default: f64) -> Result<f64, ModelError> {
        match at.entry.table.get(key) {
            None => Ok(default),
            Some(toml::Value::Float(f)) if *f >= 0.0 => Ok(*f),
            Some(toml::Value::Integer(i)) if *i >= 0 => Ok(*i as f64),
            Some(other) => Err(self.at_error(
                at,
                format!("'{key}' must be a non-negative number, found {other}"),
            )),
        }
    }

    fn layer(
        &mut self,
        at: &At<'_>,
        op: &str,
        local: &str,
        scope: &mut Scope,
        x: PortRef,
    ) -> Result<PortRef, ModelError> {
        let Some((_, keys)) = OPS.iter().find(|(name, _)| *name == op) else {
            let ops: Vec<&str> = OPS.iter().map(|(op, _)| *op).collect();
            return Err(self.at_error(
                at,
                format!("unknown op '{op}' (known ops: {})", ops.join(", ")),
            ));
        };
        self.check_keys(at, &format!("op '{op}'"), keys)?;
        let name = format!("{}{local}", scope.prefix);
        let params_before = self.params.len();
        let rows_before = self.layers.len();
        let y = match op {
            "conv" => self.conv(at, scope, &name, x)?,
            "bn" => self.batch_norm(at, &name, x)?,
            "relu" => self.add_node(at, Relu, &name, &[x])?,
            "maxpool" => {
                let kernel = self.int(at, scope, "kernel")?.unwrap_or(2);
                let stride = self.int(at, scope, "stride")?.unwrap_or(kernel);
                if kernel == 0 || stride == 0 {
                    return Err(
                        self.at_error(at, "kernel and stride must be at least 1".to_string())
                    );
                }
                self.add_node(at, MaxPool { kernel, stride }, &name, &[x])?
            }
            "avgpool" => self.add_node(at, GlobalAvgPool, &name, &[x])?,
            "flatten" => {
                let shape = &self.graph.ty(x).shape;
                let flat = vec![shape[0], shape[1..].iter().product()];
                self.add_node(at, Reshape { shape: flat }, &name, &[x])?
            }
            "linear" => self.linear(at, scope, &name, x)?,
            "add" => self.residual_add(at, scope, &name, x)?,
            _ => unreachable!("op names come from OPS"),
        };
        // A projection shortcut's convolution and BN are rows of their own, before this one.
        let params: usize = self.params[params_before..].iter().map(Param::numel).sum();
        let own_rows: usize = self.layers[rows_before..].iter().map(|l| l.params).sum();
        self.record(&name, op, y, params - own_rows, at.entry.line);
        Ok(y)
    }

    fn conv(
        &mut self,
        at: &At<'_>,
        scope: &Scope,
        name: &str,
        x: PortRef,
    ) -> Result<PortRef, ModelError> {
        let out = self.required_int(at, scope, "conv", "out")?;
        let kernel = self.required_int(at, scope, "conv", "kernel")?;
        let stride = self.int(at, scope, "stride")?.unwrap_or(1);
        let padding = self.int(at, scope, "padding")?.unwrap_or(0);
        let bias = self.bool(at, "bias", false)?;
        if stride == 0 {
            return Err(self.at_error(at, "'stride' must be at least 1".to_string()));
        }
        self.conv_node(at, name, x, out, kernel, stride, padding, bias)
    }

    #[allow(clippy::too_many_arguments)]
    fn conv_node(
        &mut self,
        at: &At<'_>,
        name: &str,
        x: PortRef,
        out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<PortRef, ModelError> {
        let in_channels = self.graph.ty(x).shape.get(1).copied().unwrap_or(0);
        let w = self.param(
            at,
            name,
            "weight",
            ParamKind::ConvWeight,
            vec![out, in_channels, kernel, kernel],
        )?;
        let mut inputs = vec![x, w];
        if bias {
            inputs.push(self.param(at, name, "bias", ParamKind::ConvBias, vec![out])?);
        }
        let op = Conv2d {
            stride,
            padding,
            bias,
        };
        self.add_node(at, op, name, &inputs)
    }

    fn batch_norm(&mut self, at: &At<'_>, name: &str, x: PortRef) -> Result<PortRef, ModelError> {
        let eps = FloatAttr(self.float(at, "eps", 1e-5)?);
        let momentum = self.float(at, "momentum", 0.1)?;
        self.bn_node(at, name, x, eps, momentum)
    }

    fn bn_node(
        &mut self,
        at: &At<'_>,
        name: &str,
        x: PortRef,
        eps: FloatAttr,
        momentum: f64,
    ) -> Result<PortRef, ModelError> {
        let shape = self.graph.ty(x).shape.clone();
        let channels = shape.get(1).copied().unwrap_or(0);
        let gamma = self.param(at, name, "gamma", ParamKind::BnGamma, vec![channels])?;
        let beta = self.param(at, name, "beta", ParamKind::BnBeta, vec![channels])?;
        let index = self.bn_layers.len();
        let y = match self.mode {
            Mode::Train => self.add_node(at, BatchNorm { eps }, name, &[x, gamma, beta])?,
            Mode::Eval => {
                let stats = TensorType::f32(&[channels]);
                let mean = self
                    .input(Role::RunningMean(index), stats.clone(), name)
                    .map_err(|e| self.shape_error(at, e))?;
                let var = self
                    .input(Role::RunningVar(index), stats, name)
                    .map_err(|e| self.shape_error(at, e))?;
                self.add_node(at, BnApply { eps }, name, &[x, mean, var, gamma, beta])?
            }
        };
        self.bn_layers.push(BnLayer {
            name: name.to_string(),
            channels,
            eps: eps.0,
            momentum,
            count: shape[0] * shape[2..].iter().product::<usize>(),
            node: y.node,
        });
        Ok(y)
    }

    fn linear(
        &mut self,
        at: &At<'_>,
        scope: &Scope,
        name: &str,
        x: PortRef,
    ) -> Result<PortRef, ModelError> {
        let out = self.required_int(at, scope, "linear", "out")?;
        let bias = self.bool(at, "bias", true)?;
        let x_type = self.graph.ty(x).clone();
        if x_type.rank() != 2 {
            return Err(self.at_error(
                at,
                format!(
                    "layer '{name}' (linear): input: expected [N, features], found {x_type}; \
                     put {{ op = \"flatten\" }} or {{ op = \"avgpool\" }} before it"
                ),
            ));
        }
        let w = self.param(
            at,
            name,
            "weight",
            ParamKind::LinearWeight,
            vec![out, x_type.shape[1]],
        )?;
        let mut inputs = vec![x, w];
        if bias {
            inputs.push(self.param(at, name, "bias", ParamKind::LinearBias, vec![out])?);
        }
        self.add_node(at, Linear { bias }, name, &inputs)
    }

    /// `y = x + shortcut(from)`, where the shortcut matches `from`'s shape to `x`'s.
    fn residual_add(
        &mut self,
        at: &At<'_>,
        scope: &mut Scope,
        name: &str,
        x: PortRef,
    ) -> Result<PortRef, ModelError> {
        let from = self.string(at, "from")?.ok_or_else(|| {
            self.at_error(
                at,
                "op 'add' needs 'from' (\"input\" or a layer name)".to_string(),
            )
        })?;
        let other = if from == "input" {
            scope.input
        } else {
            *scope.named.get(&from).ok_or_else(|| {
                let mut names: Vec<&str> = scope.named.keys().map(String::as_str).collect();
                names.sort();
                self.at_error(
                    at,
                    format!(
                        "'from = \"{from}\"' names no earlier layer here (known: input, {})",
                        names.join(", ")
                    ),
                )
            })?
        };
        let mode = self
            .string(at, "shortcut")?
            .unwrap_or_else(|| "auto".to_string());
        let (x_type, other_type) = (self.graph.ty(x).clone(), self.graph.ty(other).clone());
        let shortcut = match mode.as_str() {
            "identity" | "auto" if x_type == other_type => None,
            "identity" => {
                return Err(self.at_error(
                    at,
                    format!(
                        "shortcut \"identity\" needs equal shapes, found {x_type} and {other_type}"
                    ),
                ));
            }
            "auto" => Some(self.shortcut.ok_or_else(|| {
                self.at_error(
                    at,
                    format!(
                        "layer '{name}' adds {other_type} to {x_type}, and the model sets no \
                         `shortcut` (\"A\" or \"B\") to match them"
                    ),
                )
            })?),
            other => Some(
                other
                    .parse()
                    .map_err(|e: UnknownName| self.at_error(at, e.to_string()))?,
            ),
        };
        let matched = match shortcut {
            None => other,
            Some(kind) => self.shortcut_path(at, scope, kind, other, &x_type)?,
        };
        self.add_node(at, Add, name, &[x, matched])
    }

    /// The shortcut layers taking `from` to the shape `to`.
    fn shortcut_path(
        &mut self,
        at: &At<'_>,
        scope: &mut Scope,
        kind: Shortcut,
        from: PortRef,
        to: &TensorType,
    ) -> Result<PortRef, ModelError> {
        let from_type = self.graph.ty(from).clone();
        let stride = shortcut_stride(&from_type.shape, &to.shape).ok_or_else(|| {
            self.at_error(at, format!("no strided shortcut takes {from_type} to {to}"))
        })?;
        let local = scope
            .local_name("shortcut", None, 1)
            .map_err(|m| self.at_error(at, m))?;
        let name = format!("{}{local}", scope.prefix);
        let (in_channels, out_channels) = (from_type.shape[1], to.shape[1]);
        match kind {
            Shortcut::A => {
                if out_channels < in_channels {
                    return Err(self.at_error(
                        at,
                        format!(
                            "shortcut A can only add channels, but {from_type} must become {to}"
                        ),
                    ));
                }
                let pad_before = (out_channels - in_channels) / 2;
                let op = ShortcutA {
                    stride,
                    pad_before,
                    pad_after: out_channels - in_channels - pad_before,
                };
                let y = self.add_node(at, op, &name, &[from])?;
                self.record(&name, "shortcut_a", y, 0, at.entry.line);
                Ok(y)
            }
            Shortcut::B => {
                let conv_name = format!("{name}.conv");
                let before = self.params.len();
                let c = self.conv_node(at, &conv_name, from, out_channels, 1, stride, 0, false)?;
                self.record(
                    &conv_name,
                    "conv",
                    c,
                    self.params[before..].iter().map(Param::numel).sum(),
                    at.entry.line,
                );
                let bn_name = format!("{name}.bn");
                let before = self.params.len();
                let y = self.bn_node(at, &bn_name, c, FloatAttr(1e-5), 0.1)?;
                self.record(
                    &bn_name,
                    "bn",
                    y,
                    self.params[before..].iter().map(Param::numel).sum(),
                    at.entry.line,
                );
                Ok(y)
            }
        }
    }

    fn block(
        &mut self,
        entry: &Entry,
        block: &str,
        local: &str,
        scope: &Scope,
        x: PortRef,
        sites: &mut Vec<Site>,
    ) -> Result<PortRef, ModelError> {
        let at = At { entry, sites };
        let Some(spec) = self.spec.blocks.get(block) else {
            let known: Vec<&str> = self.spec.blocks.keys().map(String::as_str).collect();
            return Err(self.at_error(
                &at,
                format!(
                    "block '{block}' is not defined (defined blocks: {})",
                    list_or_none(&known)
                ),
            ));
        };
        if sites.iter().any(|s| s.block == block) {
            let mut chain: Vec<&str> = sites.iter().map(|s| s.block.as_str()).collect();
            chain.push(block);
            return Err(self.at_error(
                &at,
                format!("block '{block}' uses itself: {}", chain.join(" → ")),
            ));
        }
        let env = self.block_env(&at, scope, block, spec)?;
        let mut inner = Scope {
            prefix: format!("{}{local}.", scope.prefix),
            input: x,
            named: HashMap::new(),
            taken: HashSet::new(),
            counters: HashMap::new(),
            env,
        };
        sites.push(Site {
            block: block.to_string(),
            line: entry.line,
        });
        let y = self.entries(&spec.layers, &mut inner, x, sites);
        sites.pop();
        y
    }

    /// The variables inside a block: its arguments, then defaults, then the model's globals.
    fn block_env(
        &self,
        at: &At<'_>,
        scope: &Scope,
        block: &str,
        spec: &super::spec::BlockSpec,
    ) -> Result<HashMap<String, i64>, ModelError> {
        let mut env: HashMap<String, i64> =
            HashMap::from([("classes".to_string(), self.spec.classes as i64)]);
        for (key, value) in &at.entry.table {
            if COMMON_KEYS.contains(&key.as_str()) {
                continue;
            }
            if !spec.params.contains(key) {
                return Err(self.at_error(
                    at,
                    format!(
                        "block '{block}' has no parameter '{key}' (parameters: {})",
                        list_or_none(&spec.params.iter().map(String::as_str).collect::<Vec<_>>())
                    ),
                ));
            }
            let n = resolve_int(value, &scope.env)
                .map_err(|m| self.at_error(at, format!("'{key}': {m}")))?;
            env.insert(key.clone(), n as i64);
        }
        if let Some(stray) = spec.defaults.keys().find(|k| !spec.params.contains(k)) {
            return Err(self.error(
                spec.line,
                &[],
                format!("block '{block}': a default for '{stray}', which is not one of its params"),
            ));
        }
        for param in &spec.params {
            if env.contains_key(param) {
                continue;
            }
            let default = spec.defaults.get(param).ok_or_else(|| {
                self.at_error(
                    at,
                    format!("block '{block}' needs '{param}' (it has no default)"),
                )
            })?;
            let n = resolve_int(default, &HashMap::new()).map_err(|m| {
                self.error(
                    spec.line,
                    &[],
                    format!("block '{block}': default '{param}': {m}"),
                )
            })?;
            env.insert(param.clone(), n as i64);
        }
        Ok(env)
    }
}

/// A non-negative integer from a TOML value: a literal or `"$variable"`.
fn resolve_int(value: &toml::Value, env: &HashMap<String, i64>) -> Result<usize, String> {
    let n = match value {
        toml::Value::Integer(i) => *i,
        toml::Value::String(s) if s.starts_with('$') => {
            let var = &s[1..];
            *env.get(var).ok_or_else(|| {
                let mut names: Vec<&str> = env.keys().map(String::as_str).collect();
                names.sort();
                format!(
                    "'{s}' is not defined here (variables: {})",
                    names.join(", ")
                )
            })?
        }
        other => {
            return Err(format!(
                "expected an integer or \"$variable\", found {other}"
            ));
        }
    };
    usize::try_from(n).map_err(|_| format!("expected a non-negative integer, found {n}"))
}

/// The stride s with ⌈H/s⌉ = H' and ⌈W/s⌉ = W' between `[N, C, H, W]` and `[N, C', H', W']`.
fn shortcut_stride(from: &[usize], to: &[usize]) -> Option<usize> {
    if from.len() != 4 || to.len() != 4 || from[0] != to[0] {
        return None;
    }
    (1..=from[2].max(from[3]))
        .find(|&s| from[2].div_ceil(s) == to[2] && from[3].div_ceil(s) == to[3])
}

fn list_or_none(items: &[&str]) -> String {
    if items.is_empty() {
        "none".to_string()
    } else {
        items.join(", ")
    }
}
