//! Where a model runs and in which precision: `--device cpu|cuda|cuda:N` and `--dtype`.
//!
//! CPU is the default and the reference; `cuda` needs a binary built with the `cuda` cargo
//! feature (`scripts/build_cuda.sh`). Base weights and activations may be bf16/f16 on a GPU;
//! LoRA factors, value and score heads, logits and every loss stay f32 (see
//! [`crate::decoder`]), the usual mixed-precision split.

use crate::Error;
use candle_core::{DType, Device};
use std::fmt;
use std::str::FromStr;

/// A parsed `--device` value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    /// The CUDA device with this ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => n
                    .parse()
                    .map(Self::Cuda)
                    .map_err(|_| Error::Invalid(format!("device {s:?}: the ordinal after `cuda:` must be a number"))),
                None => Err(Error::Invalid(format!("unknown device {s:?} (cpu, cuda, cuda:N)"))),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. A CUDA device in a binary built without the `cuda` feature is refused
    /// with the way to get one that has it.
    pub fn open(&self) -> Result<Device, Error> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Invalid(format!(
                        "--device {self}: this binary was built without the `cuda` feature \
                         (build one with scripts/build_cuda.sh, see docs/gpu.md)"
                    )));
                }
                Device::new_cuda(*n).map_err(|e| Error::Invalid(format!("--device {self}: {e}")))
            }
        }
    }
}

/// A parsed `--dtype` value: the precision of the base weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DTypeSpec {
    /// f32 on CPU (bf16 is about 3x slower there), bf16 on a GPU.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl FromStr for DTypeSpec {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "half" => Ok(Self::F16),
            other => Err(Error::Invalid(format!("unknown dtype {other:?} (auto, f32, bf16, f16)"))),
        }
    }
}

impl fmt::Display for DTypeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl DTypeSpec {
    /// The dtype on `device`.
    pub fn resolve(&self, device: &Device) -> DType {
        match self {
            Self::Auto if device.is_cpu() => DType::F32,
            Self::Auto => DType::BF16,
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices_and_refuses_junk() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("CUDA".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(DeviceSpec::Cuda(3).to_string(), "cuda:3");
        for bad in ["cuda:x", "tpu", "cuda:", ""] {
            assert!(bad.parse::<DeviceSpec>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn auto_dtype_is_f32_on_cpu() {
        assert_eq!(DTypeSpec::Auto.resolve(&Device::Cpu), DType::F32);
        assert_eq!("bf16".parse::<DTypeSpec>().unwrap().resolve(&Device::Cpu), DType::BF16);
        assert!("f64".parse::<DTypeSpec>().is_err());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        let err = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
        assert!(err.contains("without the `cuda` feature") && err.contains("build_cuda.sh"), "{err}");
    }
}
