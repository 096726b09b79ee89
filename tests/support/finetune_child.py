"""Runs ``train_lora`` in a process of its own, so a test can SIGKILL it mid-run
and resume in the test process. Reads one JSON file naming base_dir, train, eval,
settings, work_dir and base_name; prints "done" when the training finished.

    python tests/support/finetune_child.py SPEC.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(spec_path: str) -> int:
    from personal_gpt.finetune.train import settings_from, train_lora

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    result = train_lora(Path(spec["base_dir"]), spec["train"], spec["eval"], settings_from(spec["settings"]),
                        Path(spec["work_dir"]), base_name=spec["base_name"])
    print("done", result.metrics["steps"], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
