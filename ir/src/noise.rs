//! The kinds of noise a training step adds, as the experiment and the compile choose them:
//! the covariance of ε ([`Noise`]) and the diagonal Fisher estimate it is drawn from
//! ([`FisherMode`]). The ops' Fisher rules and the step builder read them; they depend on nothing.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::UnknownName;

/// Which diagonal Fisher estimate the step computes for its noise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FisherMode {
    /// No Fisher, no noise: plain momentum SGD.
    None,
    /// `(1/M) Σₙ (∇ℓₙ)²` from per-example gradients.
    Exact,
    /// The supplement's `Σₜ a²·g²` approximation for convolutions (exact for linear layers).
    A2g2,
}

/// The covariance of the update's noise ε (its scale s is the `noise_scale` hyper-parameter).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Noise {
    /// `ε = s·√diag F̂ ⊙ ξ`, F̂ the step's [`FisherMode`] (none: no noise).
    #[default]
    DiagonalFisher,
    /// `ε = s·g ⊙ ξ`: the gradient times Gaussian noise of constant diagonal covariance s²I
    /// (supplement A.8's "multiplicative"). The update draws `s·√(g²)·ξ`, which has the same
    /// law (ξ is symmetric), so it is the Fisher update with g² in F̂'s place; no Fisher.
    Multiplicative,
    /// `ε = s·√(Tr F̂ / D)·ξ` with D the number of parameters: isotropic noise of the same
    /// total variance as the diagonal-Fisher noise (supplement A.8's "Fisher trace", the
    /// trace over the whole model spread evenly over its D elements). Needs a Fisher estimate.
    FisherTrace,
    /// `ε = s·e` with `e = (1/√M) Σₙ σₙ ∇ℓₙ`, σₙ = ±1 Rademacher: covariance s² times the full
    /// empirical Fisher `(1/M) Σₙ ∇ℓₙ ∇ℓₙᵀ` (supplement A.9). One more backward pass, from
    /// the logits with signed loss weights; no diagonal Fisher.
    FullFisherEmpirical,
    /// `ε = s·e` with `e = (1/√M) Σₙ ∇ℓₙ(ỹₙ)`, ỹₙ drawn from the model's predictive
    /// distribution: covariance s² times the full true Fisher (supplement A.9). One more
    /// backward pass at the sampled labels; no diagonal Fisher.
    FullFisherTrue,
    /// `ε = s·√T·L_G Ξ L_Aᵀ` for each convolution's and linear layer's weight (and bias):
    /// covariance s² times the layer's Kronecker-factored Fisher block `T·(Ā+λI) ⊗ (Ḡ+λI)`
    /// (supplement A.6, `crate::kfac`), from factors the step computes on refresh steps and
    /// Cholesky factors the runtime feeds. Parameters outside such layers (batch norm's γ and
    /// β) take the diagonal-Fisher noise, so the step needs a diagonal estimate for them.
    Kfac,
}

impl Noise {
    /// Whether this noise is drawn from a diagonal Fisher estimate, so needs one (exact or
    /// a2g2); the others take none.
    pub fn needs_fisher(self) -> bool {
        matches!(
            self,
            Noise::DiagonalFisher | Noise::FisherTrace | Noise::Kfac
        )
    }

    /// Whether a step with this noise and Fisher estimate adds noise at all (diagonal-Fisher
    /// noise without an estimate is plain SGD).
    pub fn is_drawn(self, fisher: FisherMode) -> bool {
        !self.needs_fisher() || fisher != FisherMode::None
    }

    /// The step kind in words: "fisher exact", "full-fisher-true noise", "fisher-trace noise
    /// (fisher a2g2)".
    pub fn describe(self, fisher: FisherMode) -> String {
        match self {
            Noise::DiagonalFisher => format!("fisher {fisher}"),
            _ if self.needs_fisher() => format!("{self} noise (fisher {fisher})"),
            _ => format!("{self} noise"),
        }
    }

    pub const ALL: [Noise; 6] = [
        Noise::DiagonalFisher,
        Noise::Multiplicative,
        Noise::FisherTrace,
        Noise::FullFisherEmpirical,
        Noise::FullFisherTrue,
        Noise::Kfac,
    ];
}

impl FromStr for Noise {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, UnknownName> {
        Noise::ALL
            .into_iter()
            .find(|n| n.to_string() == s)
            .ok_or_else(|| {
                let names: Vec<String> = Noise::ALL.iter().map(Noise::to_string).collect();
                UnknownName {
                    what: "noise",
                    found: s.to_string(),
                    expected: names.join(", "),
                }
            })
    }
}

impl fmt::Display for Noise {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Noise::DiagonalFisher => "diagonal-fisher",
            Noise::Multiplicative => "multiplicative",
            Noise::FisherTrace => "fisher-trace",
            Noise::FullFisherEmpirical => "full-fisher-empirical",
            Noise::FullFisherTrue => "full-fisher-true",
            Noise::Kfac => "kfac",
        })
    }
}

impl FisherMode {
    pub const ALL: [FisherMode; 3] = [FisherMode::None, FisherMode::Exact, FisherMode::A2g2];
}

impl fmt::Display for FisherMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FisherMode::None => "none",
            FisherMode::Exact => "exact",
            FisherMode::A2g2 => "a2g2",
        })
    }
}

impl FromStr for FisherMode {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Self, UnknownName> {
        match s {
            "none" => Ok(FisherMode::None),
            "exact" => Ok(FisherMode::Exact),
            "a2g2" => Ok(FisherMode::A2g2),
            _ => Err(UnknownName {
                what: "Fisher mode",
                found: s.to_string(),
                expected: "none, exact or a2g2".to_string(),
            }),
        }
    }
}
