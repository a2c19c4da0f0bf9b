//! What the property-test files of this crate share.

use proptest::test_runner::Config as ProptestConfig;

/// `PROPTEST_CASES` if set, else `default`: every property scales with it.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A proptest configuration with `cases(default_cases)` cases. Minimal failing cases
/// are kept as regular tests, not in a side file.
pub fn config(default_cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: cases(default_cases),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}
