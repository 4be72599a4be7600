//! Kiln's worker: lease → fetch → stage → sandbox → collect → upload → report.
