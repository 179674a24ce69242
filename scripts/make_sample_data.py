"""Write configs/data/python-docs.jsonl: paragraphs of the Python reference (pydoc_data).

Real English text with a natural spread of lengths, from the standard library
itself (no download): the sample the dynamic-padding and embedding-quality
examples run on. Run: .venv/bin/python scripts/make_sample_data.py
"""

from __future__ import annotations

import json
import pydoc_data.topics as topics
import re
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "configs" / "data" / "python-docs.jsonl"


def paragraphs() -> list[str]:
    out = []
    for _, text in sorted(topics.topics.items()):
        for p in re.split(r"\n\s*\n", text):
            p = " ".join(p.split())
            # prose only: no code, no grammar rules, no headings
            prose = len(p) > 40 and p.count(" ") > 6 and not p.startswith(("***", ">>>", "..."))
            if prose and not re.search(r"[{}=]{3,}|::=", p):
                out.append(p)
    return out


def main() -> None:
    sample = paragraphs()[::4][:400]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("".join(json.dumps({"text": t}) + "\n" for t in sample))
    print(f"{OUT}: {len(sample)} samples")


if __name__ == "__main__":
    main()
