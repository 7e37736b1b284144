//! Benchmarks only; see rust/ and python/.
