//! What the inference kernels run with on this CPU.
//!
//! Logits of two machines of the same kind can differ in their last bits when their CPUs
//! differ: gemm picks its microkernels at run time, and so do kvgate's int8 kernels
//! (`engine::int8`); the binary is compiled for the CPU it was built on (`target-cpu=native`,
//! `.cargo/config.toml`). A failure report that says which paths ran is one that can be
//! reproduced. `kvgate info` prints this; `make test` prints it
//! once before the tests.

/// The CPU and the SIMD paths the kernels take on it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CpuReport {
    /// `model name` from /proc/cpuinfo, when there is one.
    pub model: String,
    /// Logical CPUs this process may use.
    pub threads: usize,
    /// SIMD features detected at run time (of those any kernel here can use).
    pub detected: Vec<&'static str>,
    /// SIMD features the binary was compiled for (what candle's quantized kernels use).
    pub compiled: Vec<&'static str>,
    /// gemm's f32 microkernels (prefill linear layers, attention blocks).
    pub gemm: &'static str,
    /// The int8 dot products of decode (and of prefill with VNNI but no AMX).
    pub quantized: &'static str,
    /// Whether prefill multiplies on AMX tiles (bf16).
    pub amx: bool,
}

macro_rules! features {
    ($($name:tt),* $(,)?) => {
        /// Run-time detection of the features in the list.
        #[cfg(target_arch = "x86_64")]
        fn detected() -> Vec<&'static str> {
            let mut out = Vec::new();
            $(if std::arch::is_x86_feature_detected!($name) { out.push($name); })*
            out
        }
        /// The same features, as the compiler was told to assume them.
        fn compiled() -> Vec<&'static str> {
            let mut out = Vec::new();
            $(if cfg!(target_feature = $name) { out.push($name); })*
            out
        }
    };
}

features!("sse4.2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avxvnni");

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Vec<&'static str> {
    Vec::new()
}

/// What this process runs with.
pub fn report() -> CpuReport {
    let detected = detected();
    let compiled = compiled();
    let has = |f: &str| detected.contains(&f);
    // gemm 0.19 dispatches at run time; its AVX-512 kernels exist only with its `x86-v4`
    // feature, which kvgate does not enable.
    let gemm = match (has("avx2") && has("fma"), cfg!(target_arch = "x86_64")) {
        (true, _) => "x86-64-v3 (AVX2 + FMA) microkernels",
        (false, true) => "baseline SSE microkernels",
        (false, false) => "the architecture's default microkernels",
    };
    let quantized = super::int8::Kernel::detect().name();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    CpuReport { model, threads, detected, compiled, gemm, quantized, amx: super::amx::available() }
}

impl std::fmt::Display for CpuReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "cpu:               {} ({} threads)", self.model, self.threads)?;
        writeln!(f, "detected:          {}", self.detected.join(" "))?;
        writeln!(f, "compiled for:      {}", self.compiled.join(" "))?;
        writeln!(f, "gemm (f32):        {}", self.gemm)?;
        writeln!(f, "int8 kernels:      {}", self.quantized)?;
        let amx = if self.amx { "AMX bf16 tiles" } else { "no AMX (the int8 kernels or f32 gemm)" };
        write!(f, "prefill products:  {amx}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A feature the binary assumes must be there at run time (else it would not run).
    #[test]
    fn compiled_features_are_detected() {
        let r = report();
        for f in &r.compiled {
            assert!(r.detected.contains(f), "compiled for {f} but it is not detected");
        }
        assert!(r.to_string().contains("gemm (f32)"));
    }
}
