//! What this CPU can run: instruction sets detected at run time, AMX permission asked of the
//! kernel, and a name for the microarchitecture that keys the calibration cache.

use std::sync::OnceLock;

/// The instruction sets the kernels use, as this process may run them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Caps {
    /// AVX2 and FMA: the baseline of every kernel here.
    pub avx2: bool,
    /// AVX-512 F, BW and VL (512-bit f32 FMA, masked stores).
    pub avx512: bool,
    /// AVX512-BF16 (`vdpbf16ps`).
    pub avx512_bf16: bool,
    /// AVX512-VNNI (`vpdpbusd` on 512-bit registers).
    pub avx512_vnni: bool,
    /// AVX-VNNI (`vpdpbusd` on 256-bit registers, VEX-encoded).
    pub avx_vnni: bool,
    /// AMX tiles with BF16 and INT8 dot products, and the kernel's permission to use them.
    pub amx: bool,
}

impl Caps {
    /// This CPU's capabilities (detected once; AMX only where the kernel grants the tile state).
    pub fn detect() -> Self {
        static CAPS: OnceLock<Caps> = OnceLock::new();
        *CAPS.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                let avx2 = has!("avx2") && has!("fma");
                let avx512 = avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vl");
                Caps {
                    avx2,
                    avx512,
                    avx512_bf16: avx512 && has!("avx512bf16"),
                    avx512_vnni: avx512 && has!("avx512vnni"),
                    avx_vnni: avx2 && has!("avxvnni"),
                    amx: avx512 && amx_reported() && amx_permitted(),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Caps::default()
        })
    }

    /// Every capability switched off (the portable fallback: candle's own kernels).
    pub fn none() -> Self {
        Self::default()
    }

    /// These capabilities limited to those of `other` (an override may only remove).
    pub fn intersect(self, other: Caps) -> Self {
        Caps {
            avx2: self.avx2 && other.avx2,
            avx512: self.avx512 && other.avx512,
            avx512_bf16: self.avx512_bf16 && other.avx512_bf16,
            avx512_vnni: self.avx512_vnni && other.avx512_vnni,
            avx_vnni: self.avx_vnni && other.avx_vnni,
            amx: self.amx && other.amx,
        }
    }

    /// A short list of what is on, for logs: `avx2 avx512 avx512-bf16 ...`.
    pub fn describe(&self) -> String {
        let mut v = Vec::new();
        for (on, name) in [
            (self.avx2, "avx2"),
            (self.avx512, "avx512"),
            (self.avx512_bf16, "avx512-bf16"),
            (self.avx512_vnni, "avx512-vnni"),
            (self.avx_vnni, "avx-vnni"),
            (self.amx, "amx"),
        ] {
            if on {
                v.push(name);
            }
        }
        if v.is_empty() {
            "none".into()
        } else {
            v.join(" ")
        }
    }
}

/// Whether CPUID reports AMX-TILE, AMX-BF16 and AMX-INT8 (leaf 7, EDX bits 24, 22, 25).
#[cfg(target_arch = "x86_64")]
fn amx_reported() -> bool {
    // CPUID leaf 7 exists on every CPU with AVX-512 (checked by the caller first).
    let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
    [22, 24, 25].iter().all(|b| edx & (1 << b) != 0)
}

/// Asks Linux for the AMX tile-data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`): a
/// process that uses tiles without it dies of SIGILL. Granted once for the whole process; a
/// kernel or hypervisor that refuses leaves AMX off.
#[cfg(target_arch = "x86_64")]
fn amx_permitted() -> bool {
    #[cfg(target_os = "linux")]
    {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a plain system call with integer arguments; it touches no memory of ours.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack)
            );
        }
        ret == 0 && super::amx::self_test()
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The CPU's model name and the flags the kernels care about, as `lscpu` would show them: the
/// key of the calibration cache (one microarchitecture, one set of choices).
pub fn cpu_model() -> String {
    let name = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let family = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .map(|s| {
            let field = |key: &str| {
                s.lines()
                    .find(|l| l.split(':').next().map(str::trim) == Some(key))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
                    .unwrap_or_default()
            };
            format!("{} family {} model {}", field("vendor_id"), field("cpu family"), field("model"))
        })
        .unwrap_or_default();
    format!("{name} ({family})")
}
