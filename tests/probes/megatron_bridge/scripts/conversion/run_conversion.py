"""PROBE, not Megatron-Bridge v0.6.0's scripts/conversion/run_conversion.py (the HF <-> Megatron conversion
worker; it needs Megatron-Bridge's container). Stands at megatron.megatron_bridge_dir in the SLURM execution
tests (tests/test_slurm_exec.py). It records its argv and environment as JSON in $PROBE_RECORD and checks
what the real worker requires: an `import` or `export` subcommand, and a destination (--megatron-path
for import, --hf-path for export) that is absent or empty, since Megatron-Bridge refuses to convert into a
non-empty directory (issue 9, item 3). Then it writes a marker into the destination, as a conversion
would write its checkpoint. Exit 3 on a failed check. What only a GPU cluster verifies: the conversion itself.
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

argv = sys.argv[1:]
record = {"probe": "run_conversion", "argv": argv, "host": socket.gethostname(), "errors": []}
direction = argv[0] if argv else None
if direction not in ("import", "export"):
    record["errors"].append(f"first argument {direction!r}: expected import or export")
flag = "--megatron-path" if direction == "import" else "--hf-path"
dest = Path(argv[argv.index(flag) + 1]) if flag in argv else None
if dest is None:
    record["errors"].append(f"no {flag}")
elif dest.exists() and any(dest.iterdir()):
    record["errors"].append(f"destination {dest} is not empty: {sorted(p.name for p in dest.iterdir())}")
record["dest_was_empty"] = not record["errors"]
if not record["errors"]:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "PROBE_CONVERTED").write_text(json.dumps(argv))
Path(os.environ["PROBE_RECORD"]).write_text(json.dumps(record, indent=1))
print(f"PROBE run_conversion {direction}: errors: {record['errors'] or 'none'}", flush=True)
sys.exit(3 if record["errors"] else 0)
