"""Build what `spark-submit --py-files` needs: a zip of glan-spark's own packages.

Spark puts `.zip` and `.egg` files on the executors' Python path, but not `.whl` files, so the
wheel (for `pip install` on Databricks/EMR nodes) and this zip (for `--py-files`) are both built.
Third-party dependencies are installed on the nodes (Databricks cluster libraries, an EMR
bootstrap action), not zipped: several of them (pyarrow, pandas, deltalake) are compiled.

Run: python -m jobs.spark.package --out dist
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("jobs", "udfs", "prompts", "conf")
SUFFIXES = (".py", ".j2", ".yaml", ".json")


def version() -> str:
    try:
        return metadata.version("glan-spark")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def build_pyfiles(out_dir: Path, repo: Path = REPO) -> Path:
    """Zip jobs/, udfs/, prompts/ and conf/ (sources, templates, YAML) with stable entry order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"glan_spark-{version()}-pyfiles.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for package in PACKAGES:
            for path in sorted((repo / package).rglob("*")):
                if path.is_file() and path.suffix in SUFFIXES and "__pycache__" not in path.parts:
                    info = zipfile.ZipInfo(str(path.relative_to(repo)), date_time=(2020, 1, 1, 0, 0, 0))
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, path.read_bytes())
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="dist", help="output folder (default: dist)")
    args = parser.parse_args(argv)
    target = build_pyfiles(Path(args.out))
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
