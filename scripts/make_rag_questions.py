"""Build the retrieval question set over the Python documentation (Debian's python3.11-doc reST sources).

Two kinds of question, each with its gold file and the character span that answers it:
- "faq": the Python FAQ's own questions (its section titles end in "?"); the gold span is the section.
- "function": "Which function returns ...?" made from the first sentence of a library function's entry
  (`.. function:: name(...)` whose description starts "Return ..."); the gold span is the entry, the answer
  is the function's name.
Deterministic (a fixed seed), so the committed file can be rebuilt and checked:

    python scripts/make_rag_questions.py > src/mini_claude/rag/data/python_docs_questions.jsonl
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
MODULES = """functions os os.path math string re json random shutil itertools functools collections datetime time
subprocess pathlib statistics textwrap glob tempfile csv hashlib base64 heapq bisect copy pickle sqlite3
urllib.parse socket threading logging operator zlib gzip sys io struct uuid secrets unicodedata difflib fnmatch
inspect platform shlex calendar decimal cmath signal locale gettext html zipfile tarfile codecs""".split()  # noqa: SIM905
ROLE = re.compile(r":[\w:]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
ADORNMENT = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")


def clean(text: str) -> str:
    text = ROLE.sub(r"\1", text).replace("``", "").replace("*", "")
    return " ".join(text.split())


def faq_questions() -> list[dict]:
    out = []
    for path in sorted((DOCS / "faq").glob("*.rst.txt")):
        text = path.read_text()
        lines = text.split("\n")
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line) + 1)
        heads = [
            i
            for i in range(len(lines) - 1)
            if lines[i].strip()
            and ADORNMENT.match(lines[i + 1])
            and len(lines[i + 1].rstrip()) >= len(lines[i].rstrip())
            and not ADORNMENT.match(lines[i])
        ]
        for n, i in enumerate(heads):
            title = lines[i].strip()
            end = offsets[heads[n + 1]] if n + 1 < len(heads) else len(text)
            if title.endswith("?") and 20 <= len(title) <= 120 and end - offsets[i] > 200:
                out.append(
                    {
                        "kind": "faq",
                        "question": clean(title),
                        "file": f"faq/{path.name}",
                        "start": offsets[i],
                        "end": end,
                        "answer": None,
                    }
                )
    return out


def function_questions() -> list[dict]:
    out = []
    entry = re.compile(r"^\.\. function:: ([\w.]+)\(.*\n((?:[ \t]+:.*\n)*)\n((?:[ \t]+.+\n)+)", re.M)
    for module in MODULES:
        path = DOCS / "library" / f"{module}.rst.txt"
        if not path.exists():
            continue
        text = path.read_text()
        for m in entry.finditer(text):
            paragraph = clean(m.group(3))
            first = re.split(r"(?<=[a-z)\]])\.\s", paragraph + " ", maxsplit=1)[0].rstrip(". ")
            if not first.startswith("Return ") or not 25 <= len(first) <= 160:
                continue
            name = m.group(1)
            question = "Which function returns " + first[len("Return ") :] + "?"
            out.append(
                {
                    "kind": "function",
                    "question": question,
                    "file": f"library/{path.name}",
                    "start": m.start(),
                    "end": m.end(),
                    "answer": name,
                }
            )
    return out


def main() -> None:
    rng = random.Random(0)
    faq = faq_questions()
    functions = function_questions()
    per_file: dict[str, int] = {}
    picked_functions = []
    for q in rng.sample(functions, len(functions)):
        if per_file.get(q["file"], 0) < 3:
            per_file[q["file"]] = per_file.get(q["file"], 0) + 1
            picked_functions.append(q)
    chosen = rng.sample(faq, min(50, len(faq))) + picked_functions[:70]
    chosen.sort(key=lambda q: (q["kind"], q["file"], q["start"]))
    for i, q in enumerate(chosen):
        text = (DOCS / q["file"]).read_text()
        record = {"id": f"q{i:03d}", **q, "anchor": text[q["start"] : q["start"] + 40]}
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{len(chosen)} questions ({len(faq)} FAQ and {len(functions)} function candidates)", file=sys.stderr)


if __name__ == "__main__":
    main()
