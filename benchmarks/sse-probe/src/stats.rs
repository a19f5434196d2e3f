//! Latency samples and their summary.

#[derive(Default)]
pub struct Samples {
    pub ttft: Vec<f64>,
    /// Gap between consecutive events, per token (what a reader of the stream sees).
    pub itl: Vec<f64>,
    /// Per request: (last token - first token) / (tokens - 1), aiperf's and genai-perf's ITL.
    pub itl_request: Vec<f64>,
    pub tokens: u64,
    pub ok: u64,
    pub errors: u64,
    /// Sum of request durations (seconds): divided by the wall time, the mean in flight.
    pub busy_s: f64,
}

impl Samples {
    pub fn merge(&mut self, other: Samples) {
        self.ttft.extend(other.ttft);
        self.itl.extend(other.itl);
        self.itl_request.extend(other.itl_request);
        self.tokens += other.tokens;
        self.ok += other.ok;
        self.errors += other.errors;
        self.busy_s += other.busy_s;
    }
}

/// Linear-interpolated percentile (as numpy's default); NaN when empty.
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let k = (values.len() - 1) as f64 * p / 100.0;
    let lo = k.floor() as usize;
    let hi = (lo + 1).min(values.len() - 1);
    values[lo] + (values[hi] - values[lo]) * (k - lo as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        assert_eq!(percentile(&mut v, 0.0), 1.0);
        assert_eq!(percentile(&mut v, 100.0), 4.0);
        assert!((percentile(&mut v, 50.0) - 2.5).abs() < 1e-12);
        assert!(percentile(&mut [], 50.0).is_nan());
    }
}
