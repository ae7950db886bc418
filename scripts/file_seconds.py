"""Write tests/file_seconds.json from a test run's JUnit XML: each test file's seconds.

    make test ARGS="--junitxml=/tmp/suite.xml"
    python scripts/file_seconds.py /tmp/suite.xml

tests/conftest.py hands the files to the xdist workers longest first from it
(``--dist loadfile`` keeps a file on one worker): in the order xdist chose (files with the
most tests first), a file that starts several servers could begin last and run alone on
one core while the others had finished. A file not in it counts as a median one, so the
figures need only be roughly current.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "file_seconds.json"


def main(xml_path: str) -> None:
    seconds: dict[str, float] = defaultdict(float)
    for case in ET.parse(xml_path).iter("testcase"):
        # classname "tests.test_x" or "tests.test_x.TestClass": the module's file
        parts = case.get("classname", "").split(".")
        module = next((p for p in parts if p.startswith("test_")), None)
        if module is not None:
            seconds[f"tests/{module}.py"] += float(case.get("time", 0.0))
    OUT.write_text(json.dumps({k: round(v, 1) for k, v in sorted(seconds.items())}, indent=0) + "\n")
    print(f"{OUT}: {len(seconds)} files, {sum(seconds.values()):.0f} s in all")


if __name__ == "__main__":
    main(*sys.argv[1:])
