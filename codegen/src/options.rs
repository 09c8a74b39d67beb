//! How a step is compiled, one type per choice: [`Precision`] (how convolution GEMMs multiply),
//! [`Arch`] (the PTX target and the cost model's figures for it), [`LowerOptions`] (what the
//! lowering is told) and [`CompileOptions`], the whole set, built once by each front end and
//! recorded in the artifact. The names a choice
//! goes by (option values, words in reports, directory suffixes, bench variants) are here too.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;

use fisherc_ir::error::UnknownName;
use fisherc_ir::optimize::cost::{Device, H100};
use serde::{Deserialize, Serialize};

/// Slices in flight in the convolutions' GEMMs by default: double buffering, one being fetched
/// while one multiplies. A third timed no faster on the H200 (benches/RESULTS.md): the data
/// gradients wait on the shared-memory instruction queue and the L2, not on a slice's loads.
pub const DEFAULT_STAGES: u32 = 2;

/// The pipeline depths a compile accepts (`--stages`, `compile.stages`): a weight gradient's
/// input patch and its slice of dy fit in shared memory 4 deep.
pub const STAGE_RANGE: RangeInclusive<u32> = 2..=4;

/// How convolution GEMMs multiply (in experiment files: `fp32` or `off`, `3xtf32`, `tf32`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Precision {
    /// fp32 FMA.
    #[default]
    #[serde(rename = "fp32", alias = "off")]
    Fp32,
    /// TF32 tensor cores, each operand split into a TF32 part and a TF32 remainder and three
    /// products summed: fp32 accuracy.
    #[serde(rename = "3xtf32")]
    Tf32x3,
    /// TF32 tensor cores, one product of the operands rounded to TF32 (as PyTorch's
    /// `allow_tf32` trades accuracy for speed): a third of the tensor-core work, relative
    /// errors near 10⁻³.
    #[serde(rename = "tf32")]
    Tf32,
}

/// The names one precision goes by.
struct PrecisionNames {
    precision: Precision,
    /// On the command line and in experiment files: "3xtf32".
    value: &'static str,
    /// What the value says, for help texts.
    help: &'static str,
    /// In reports: "tensor cores (3xTF32)"; empty for fp32 FMA.
    words: &'static str,
    /// In artifact directories and bench variants (`_tc`, `fused-tc`); empty for fp32 FMA.
    suffix: &'static str,
    /// The fused bench variant on it: "fused-tc".
    variant: &'static str,
    /// In the text kernel names hash (`LowerOptions::name_key`).
    key: &'static str,
}

/// Every precision's names: the one table of them.
const PRECISION_NAMES: [PrecisionNames; 3] = [
    PrecisionNames {
        precision: Precision::Fp32,
        value: "fp32",
        help: "fp32 FMA",
        words: "",
        suffix: "",
        variant: "fused",
        key: "Off",
    },
    PrecisionNames {
        precision: Precision::Tf32x3,
        value: "3xtf32",
        help: "Three TF32 products per operand pair: fp32 accuracy",
        words: "tensor cores (3xTF32)",
        suffix: "tc",
        variant: "fused-tc",
        key: "Tf32x3",
    },
    PrecisionNames {
        precision: Precision::Tf32,
        value: "tf32",
        help: "One TF32 product",
        words: "tensor cores (one TF32 product)",
        suffix: "tf32",
        variant: "fused-tf32",
        key: "Tf32",
    },
];

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::Fp32, Precision::Tf32x3, Precision::Tf32];

    /// Whether convolutions run on tensor cores.
    pub fn on_tensor_cores(self) -> bool {
        self != Precision::Fp32
    }

    fn names(self) -> &'static PrecisionNames {
        PRECISION_NAMES
            .iter()
            .find(|n| n.precision == self)
            .expect("every precision has names")
    }

    /// On the command line and in experiment files: "3xtf32".
    pub fn value(self) -> &'static str {
        self.names().value
    }

    /// What [`Precision::value`] says, for help texts.
    pub fn help(self) -> &'static str {
        self.names().help
    }

    /// The fused bench variant on this precision: "fused", "fused-tc", "fused-tf32".
    pub fn variant(self) -> &'static str {
        self.names().variant
    }

    /// In reports: "tensor cores (3xTF32)"; empty for fp32 FMA.
    pub fn words(self) -> &'static str {
        self.names().words
    }

    /// In artifact directories and bench variants: "tc", "tf32"; empty for fp32 FMA.
    pub fn suffix(self) -> &'static str {
        self.names().suffix
    }

    /// Its name in the text kernel names hash.
    pub fn key(self) -> &'static str {
        self.names().key
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.value())
    }
}

impl FromStr for Precision {
    type Err = UnknownName;

    /// A value as [`Precision::value`] names it (`off` too, for fp32, as experiment files
    /// may say).
    fn from_str(s: &str) -> Result<Precision, UnknownName> {
        PRECISION_NAMES
            .iter()
            .find(|n| n.value == s || (s == "off" && n.precision == Precision::Fp32))
            .map(|n| n.precision)
            .ok_or_else(|| UnknownName {
                what: "precision",
                found: s.to_string(),
                expected: "fp32, 3xtf32 or tf32".to_string(),
            })
    }
}

/// A PTX target.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    /// Ampere (A100).
    #[serde(rename = "sm_80")]
    Sm80,
    /// Hopper (H100, H200).
    #[default]
    #[serde(rename = "sm_90")]
    Sm90,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Sm80, Arch::Sm90];

    /// The target's name in PTX and on the command line: `sm_90`.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sm80 => "sm_80",
            Arch::Sm90 => "sm_90",
        }
    }

    /// The compute capability it needs, as the driver reports it (major·10 + minor).
    pub fn compute_capability(self) -> u32 {
        match self {
            Arch::Sm80 => 80,
            Arch::Sm90 => 90,
        }
    }

    /// The figures the optimizer's cost model ranks alternatives with. Both targets rank with
    /// the H100's: an A100's pick other fusions for some sm_80 artifacts, and no A100 has
    /// timed whether those are better.
    pub fn device(self) -> &'static Device {
        match self {
            Arch::Sm80 | Arch::Sm90 => &H100,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<Arch, UnknownName> {
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| UnknownName {
                what: "PTX target",
                found: s.to_string(),
                expected: "sm_80 or sm_90".to_string(),
            })
    }
}

/// Choices of the lowering that are not the op's: part of every kernel's name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LowerOptions {
    /// How convolution GEMMs multiply (`lower/gemm/`).
    pub precision: Precision,
    /// K slices a convolution GEMM gathered on both sides keeps in flight
    /// (`lower::gemm::staged_gemm`), where its shared memory allows; at least 2.
    pub stages: u32,
}

impl LowerOptions {
    /// The text a kernel's name hashes with its shapes when these options are not the
    /// defaults: fixed, so that kernel names do not follow the types' names.
    pub fn name_key(&self) -> String {
        format!(
            "LowerOptions {{ tensor_cores: {}, stages: {} }}",
            self.precision.key(),
            self.stages
        )
    }
}

impl Default for LowerOptions {
    fn default() -> LowerOptions {
        LowerOptions {
            precision: Precision::default(),
            stages: DEFAULT_STAGES,
        }
    }
}

/// Everything a compile chooses besides the step itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Recorded", into = "Recorded")]
pub struct CompileOptions {
    /// Run the fusion rules (`false`: the unfused baseline, every op its own kernels).
    pub fused: bool,
    /// The lowering's choices: precision and pipeline depth.
    pub lowering: LowerOptions,
    pub arch: Arch,
}

impl Default for CompileOptions {
    fn default() -> CompileOptions {
        CompileOptions {
            fused: true,
            lowering: LowerOptions::default(),
            arch: Arch::default(),
        }
    }
}

impl CompileOptions {
    /// Fused or not, on fp32 FMA, for sm_90.
    pub fn fused(fused: bool) -> CompileOptions {
        CompileOptions {
            fused,
            ..CompileOptions::default()
        }
    }

    pub fn precision(&self) -> Precision {
        self.lowering.precision
    }

    pub fn stages(&self) -> u32 {
        self.lowering.stages
    }

    /// In words: fused or not, how convolutions multiply, and the GEMM pipeline's depth where
    /// it is not the default ("fused, tensor cores (3xTF32), 3 stages").
    pub fn describe(&self) -> String {
        let words = self.precision().words();
        let variant = match (self.fused, words) {
            (false, _) => "unfused".to_string(),
            (true, "") => "fused".to_string(),
            (true, words) => format!("fused, {words}"),
        };
        format!("{variant}{}", stages_note(self.stages()))
    }

    /// What an artifact directory's name adds for these options: `_unfused`, `_tc`, `_s3`.
    pub fn dir_suffix(&self) -> String {
        let mut suffix = String::new();
        if !self.fused {
            suffix.push_str("_unfused");
        }
        if self.precision().on_tensor_cores() {
            suffix.push('_');
            suffix.push_str(self.precision().suffix());
        }
        if self.stages() != DEFAULT_STAGES {
            suffix.push_str(&format!("_s{}", self.stages()));
        }
        suffix
    }
}

/// `", N stages"` where `stages` is not the default, else nothing: for describing a compile.
pub fn stages_note(stages: u32) -> String {
    if stages == DEFAULT_STAGES {
        String::new()
    } else {
        format!(", {stages} stages")
    }
}

/// How an artifact's `plan.json` records [`CompileOptions`], as artifacts always have: the
/// precision as two flags, fields missing from older artifacts at what those were compiled
/// with.
#[derive(Serialize, Deserialize)]
struct Recorded {
    fused: bool,
    /// Convolutions on TF32 tensor cores...
    #[serde(default)]
    tensor_cores: bool,
    /// ... with one TF32 product rather than three.
    #[serde(default)]
    single_tf32: bool,
    #[serde(default = "default_stages")]
    stages: u32,
    arch: Arch,
}

fn default_stages() -> u32 {
    DEFAULT_STAGES
}

impl From<Recorded> for CompileOptions {
    fn from(r: Recorded) -> CompileOptions {
        let precision = match (r.tensor_cores, r.single_tf32) {
            (false, _) => Precision::Fp32,
            (true, false) => Precision::Tf32x3,
            (true, true) => Precision::Tf32,
        };
        CompileOptions {
            fused: r.fused,
            lowering: LowerOptions {
                precision,
                stages: r.stages,
            },
            arch: r.arch,
        }
    }
}

impl From<CompileOptions> for Recorded {
    fn from(o: CompileOptions) -> Recorded {
        Recorded {
            fused: o.fused,
            tensor_cores: o.precision().on_tensor_cores(),
            single_tf32: o.precision() == Precision::Tf32,
            stages: o.stages(),
            arch: o.arch,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(fused: bool, precision: Precision, stages: u32, arch: Arch) -> CompileOptions {
        CompileOptions {
            fused,
            lowering: LowerOptions { precision, stages },
            arch,
        }
    }

    #[test]
    fn recorded_as_artifacts_always_were_and_read_back() {
        let o = options(true, Precision::Tf32, 3, Arch::Sm80);
        let json = serde_json::to_value(o).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"fused": true, "tensor_cores": true, "single_tf32": true,
                               "stages": 3, "arch": "sm_80"})
        );
        for precision in Precision::ALL {
            for arch in Arch::ALL {
                let o = options(false, precision, 4, arch);
                let back: CompileOptions =
                    serde_json::from_value(serde_json::to_value(o).unwrap()).unwrap();
                assert_eq!(back, o);
            }
        }
    }

    #[test]
    fn older_artifacts_read_with_what_they_were_compiled_with() {
        let old = serde_json::json!({"fused": false, "arch": "sm_90"});
        let o: CompileOptions = serde_json::from_value(old).unwrap();
        assert_eq!(o, options(false, Precision::Fp32, 2, Arch::Sm90));
        let bad = serde_json::json!({"fused": true, "arch": "sm_70"});
        assert!(serde_json::from_value::<CompileOptions>(bad).is_err());
    }

    #[test]
    fn every_name_reads_back() {
        for precision in Precision::ALL {
            assert_eq!(precision.value().parse::<Precision>().unwrap(), precision);
            assert_eq!(precision.to_string(), precision.value());
        }
        assert_eq!("off".parse::<Precision>().unwrap(), Precision::Fp32);
        assert!(
            "fp16"
                .parse::<Precision>()
                .unwrap_err()
                .to_string()
                .contains("fp16")
        );
        for arch in Arch::ALL {
            assert_eq!(arch.name().parse::<Arch>().unwrap(), arch);
        }
        assert!("sm_70".parse::<Arch>().is_err());
    }

    #[test]
    fn names_say_what_differs_from_the_default() {
        assert_eq!(CompileOptions::default().dir_suffix(), "");
        assert_eq!(CompileOptions::default().describe(), "fused");
        let o = options(true, Precision::Tf32x3, 3, Arch::Sm90);
        assert_eq!(o.dir_suffix(), "_tc_s3");
        assert_eq!(o.describe(), "fused, tensor cores (3xTF32), 3 stages");
        let o = options(false, Precision::Tf32, 2, Arch::Sm80);
        assert_eq!(o.dir_suffix(), "_unfused_tf32");
        assert_eq!(o.describe(), "unfused");
    }
}
