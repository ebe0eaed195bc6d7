"""Cost of exporting a model to ONNX: wall time, peak RSS and file sizes.

    python -m sdtrt.benchmarks.export_cost --source sd15-random --precision fp16 --json benchmarks/results/x.json

The export runs as a child process (the real `sdtrt export` command), so the peak RSS measured is that of the
export alone. Target on a 2-core / 24 GiB machine: sd15-random fp16 completes with peak RSS <= 12 GiB.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(source: str, precision: str, out: Path) -> dict:
    sdtrt = shutil.which("sdtrt", path=os.path.dirname(sys.executable)) or "sdtrt"
    command = [sdtrt, "-q", "export", source, "--out", str(out), "--precision", precision]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"export failed ({result.returncode}):\n{result.stderr}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    manifest = json.loads((out / "manifest.json").read_text())
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    import torch

    return {
        "benchmark": "export_cost",
        "source": source,
        "precision": precision,
        "command": " ".join(["sdtrt", *command[1:-4], "--out", "DIR", *command[-2:]]),
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "files_mib": {k: round(v / 2**20, 1) for k, v in files.items()},
        "components": {k: {"file": v["file"], "data_file": v["data_file"]} for k, v in manifest["components"].items()},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "versions": manifest["versions"] | {"torch_runtime": torch.__version__},
        "date": datetime.date.today().isoformat(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", default="sd15-random")
    parser.add_argument("--precision", default="fp16", choices=["fp32", "fp16"])
    parser.add_argument("--json", type=Path, help="write the result row here")
    parser.add_argument("--keep", type=Path, help="keep the artifact folder here instead of deleting it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sdtrt-export-cost-") as tmp:
        out = args.keep or Path(tmp) / "artifacts"
        row = measure(args.source, args.precision, out)
    print(f"{row['source']} {row['precision']}: {row['wall_s']} s wall, peak RSS {row['peak_rss_gib']} GiB")
    for name, size in row["files_mib"].items():
        print(f"  {name:<24} {size:>9.1f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
