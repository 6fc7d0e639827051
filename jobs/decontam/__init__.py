"""Decontamination against public benchmarks: n-grams and MinHash, the benchmark registry and fetch, detection."""
