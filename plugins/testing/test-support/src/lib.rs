//! What the misbehaving test components share: the trigger that makes them misbehave and the
//! valid answers they give otherwise (so the host's load-time validation accepts them).
//!
//! Not a component: a plain library linked into the `test-*` components.

/// The `budget` on which the misbehaving selectors misbehave. The host validates a selector at
/// load with a canned request of another budget, and its tests send this one.
pub const MISBEHAVE_BUDGET: u32 = 7;

/// A valid selection: the `budget` largest deviations (ties to the lower index), ascending.
pub fn top_deviation(deviations: &[f32], budget: u32) -> Vec<u32> {
    let mut order: Vec<u32> = (0..deviations.len() as u32).collect();
    order.sort_by(|&a, &b| deviations[b as usize].total_cmp(&deviations[a as usize]).then(a.cmp(&b)));
    order.truncate(budget as usize);
    order.sort_unstable();
    order
}

/// Valid cut points: every segment start, and every `target` tokens inside each segment.
pub fn fixed_cuts(len: usize, segment_starts: &[u32], target: u32) -> Vec<u32> {
    let mut bounds: Vec<usize> = segment_starts.iter().map(|&s| s as usize).filter(|&s| s < len).collect();
    bounds.extend([0, len]);
    bounds.sort_unstable();
    bounds.dedup();
    let step = target.max(1) as usize;
    let mut cuts: Vec<u32> = bounds.windows(2).flat_map(|w| (w[0]..w[1]).step_by(step)).map(|c| c as u32).collect();
    cuts.retain(|&c| c > 0);
    cuts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_deviation_is_a_valid_selection() {
        assert_eq!(top_deviation(&[0.1, 5.0, 0.3, 9.0, 0.0], 2), vec![1, 3]);
        assert_eq!(top_deviation(&[1.0; 4], 2), vec![0, 1]);
        assert_eq!(top_deviation(&[1.0; 2], 9), vec![0, 1]);
    }

    #[test]
    fn fixed_cuts_are_valid_cut_points() {
        assert_eq!(fixed_cuts(25, &[0, 4, 14], 6), vec![4, 10, 14, 20]);
        assert_eq!(fixed_cuts(3, &[0, 7], 0), vec![1, 2]);
        assert_eq!(fixed_cuts(0, &[0], 4), Vec::<u32>::new());
    }
}
