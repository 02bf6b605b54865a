# ruff: noqa: E501  (the hand-written questions read best as a table, one question a line)
"""Build the paraphrased question set over the Python documentation (Debian's python3.11-doc reST sources).

Why a second set: the first (`make_rag_questions.py`) copies section titles and the first sentence of function
entries, so a keyword search finds them almost word for word and BM25 is near perfect. These questions were
written by hand, one by one, after reading the entry that answers each: a user's own words for what they want
to do ("put the items of my list in a random order"), mostly without the function's name or the entry's
phrasing, the way questions reach a documentation assistant. They are not generated from the text.

Each is (file, anchor, question): the anchor is the start of the line that opens the answering entry (a
`.. function::`-style directive, or a section title). This script only locates the gold span: from the anchor
to the end of its entry (the next non-blank line indented no deeper than the directive) or, for a title, to
the next title. An anchor that is missing or not unique is an error, so the set stays tied to these sources.

Every question has a `split`: "dev" (every fifth, ids 0, 5, 10, ...) or "test". Anything tuned on this set
(a fusion weight, say) is chosen on "dev" and reported on "test".

    python scripts/make_paraphrased_questions.py > src/mini_claude/rag/data/python_docs_paraphrased.jsonl
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
ADORNMENT = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")

# (file under library/ unless it has a folder, anchor at a line start, question in a user's words)
QUESTIONS: list[tuple[str, str, str]] = [
    ("math", ".. function:: gcd(", "What's the largest whole number that divides two integers evenly?"),
    ("math", ".. function:: isqrt(", "How can I get the integer square root of a huge int without float errors?"),
    ("math", ".. function:: comb(", "How many ways are there to pick k items out of n when order doesn't matter?"),
    ("math", ".. function:: fsum(", "Adding up lots of floats loses precision; is there a more accurate way to total them?"),
    ("math", ".. function:: isclose(", "How should I test whether two floating point results are approximately equal?"),
    ("math", ".. function:: dist(", "Compute the straight-line distance between two points given as coordinate lists"),
    ("math", ".. function:: prod(", "multiply all the numbers in a list together"),
    ("math", ".. function:: radians(", "my angle is in degrees but the trig functions want something else, how do I convert it?"),
    ("math", ".. function:: log1p(", "natural log of 1 plus a very tiny number without losing accuracy"),
    ("cmath", ".. function:: polar(", "turn a complex number into its magnitude and angle"),
    ("statistics", ".. function:: median(", "find the middle value of my list of measurements"),
    ("statistics", ".. function:: stdev(", "how spread out is a sample of numbers (the sample estimate, not the whole population)?"),
    ("statistics", ".. function:: quantiles(", "cut my data into quartiles and get the boundary values"),
    ("statistics", ".. function:: linear_regression(", "fit a straight line to x and y values and get its slope and intercept"),
    ("statistics", ".. function:: multimode(", "I need every most-common value when several are tied for first place"),
    ("statistics", ".. function:: harmonic_mean(", "average of speeds driven over equal distances"),
    ("statistics", ".. class:: NormalDist(", "model a bell curve with a given average and spread and ask for probabilities"),
    ("random", ".. function:: shuffle(", "put the items of my list in a random order, in place"),
    ("random", ".. function:: sample(", "pick several different elements at random, no repeats"),
    ("random", ".. function:: choices(", "draw random picks with replacement where some options are more likely than others"),
    ("random", ".. function:: seed(", "make my random numbers come out the same on every run"),
    ("random", ".. function:: uniform(", "a random decimal number somewhere between two bounds"),
    ("secrets", ".. function:: token_urlsafe(", "generate a hard to guess string I can put in a password reset link"),
    ("secrets", ".. function:: compare_digest(", "compare two secret tokens without leaking timing information to an attacker"),
    ("hashlib", ".. function:: pbkdf2_hmac(", "turn a user's password plus salt into a key with many iterations so it is slow to brute force"),
    ("hashlib", ".. function:: file_digest(", "compute the SHA-256 checksum of a file I have opened"),
    ("hashlib", ".. function:: scrypt(", "a memory-hard way to hash passwords"),
    ("itertools", ".. function:: groupby(", "bunch together consecutive items that share the same key"),
    ("itertools", ".. function:: chain(", "loop over several lists one after another as if they were a single sequence"),
    ("itertools", ".. function:: islice(", "take just the first ten items of a generator without building a list"),
    ("itertools", ".. function:: product(", "every combination of one item from each of several lists, like nested for loops"),
    ("itertools", ".. function:: permutations(", "all the possible orderings of a sequence"),
    ("itertools", ".. function:: accumulate(", "running totals of a list of numbers"),
    ("itertools", ".. function:: pairwise(", "iterate over each element together with the one right after it"),
    ("itertools", ".. function:: zip_longest(", "zip lists of unequal length and fill in the gaps instead of stopping early"),
    ("itertools", ".. function:: tee(", "split one iterator into several independent copies"),
    ("functools", ".. decorator:: lru_cache(", "remember results of an expensive function so calls with the same arguments return instantly"),
    ("functools", ".. function:: partial(", "freeze some arguments of a function to get a new callable that needs fewer"),
    ("functools", ".. decorator:: total_ordering", "I wrote __eq__ and __lt__; can Python fill in the remaining comparison methods?"),
    ("functools", ".. decorator:: wraps(", "my decorator hides the original function's name and docstring; how do I keep them?"),
    ("functools", ".. function:: reduce(", "collapse a sequence into a single value by applying a two-argument function cumulatively"),
    ("functools", ".. decorator:: singledispatch", "choose which implementation runs based on the type of the first argument"),
    ("functools", ".. function:: cmp_to_key(", "I have an old-style comparison function returning -1, 0 or 1; how do I sort with it?"),
    ("operator", ".. function:: itemgetter(", "sort a list of tuples by their second element without writing a lambda"),
    ("operator", ".. function:: attrgetter(", "a callable that fetches an attribute, even a dotted one like 'owner.name', from objects"),
    ("os.path", ".. function:: splitext(", "separate a filename from its extension"),
    ("os.path", ".. function:: expanduser(", "turn a path starting with ~ into the full home directory path"),
    ("os.path", ".. function:: getmtime(", "when was this file last changed?"),
    ("os.path", ".. function:: relpath(", "express a path relative to some other directory"),
    ("os.path", ".. function:: realpath(", "follow symbolic links to get the canonical location of a file"),
    ("os.path", ".. function:: commonpath(", "longest directory that several paths share"),
    ("os", ".. function:: walk(", "visit every folder and file under a directory, recursively"),
    ("os", ".. function:: makedirs(", "create a nested folder including any missing parent folders"),
    ("os", ".. data:: environ", "read the environment variables my program was started with"),
    ("os", ".. function:: cpu_count(", "how many processors does this machine have?"),
    ("os", ".. function:: scandir(", "list a directory quickly and also know which entries are files or folders"),
    ("os", ".. function:: urandom(", "get random bytes from the operating system, good enough for cryptography"),
    ("os", ".. function:: replace(", "rename a file so that it overwrites the destination if it already exists"),
    ("os", ".. function:: chmod(", "change a file's permission bits, e.g. make it read-only"),
    ("shutil", ".. function:: rmtree(", "delete a folder with everything inside it"),
    ("shutil", ".. function:: copytree(", "duplicate a whole directory with all its subfolders to a new place"),
    ("shutil", ".. function:: which(", "find where an executable program lives on the PATH"),
    ("shutil", ".. function:: make_archive(", "pack a directory into a zip or tar.gz file"),
    ("shutil", ".. function:: disk_usage(", "how much free space is left on a drive?"),
    ("shutil", ".. function:: copy2(", "copy a file and keep its modification time"),
    ("tempfile", ".. class:: TemporaryDirectory(", "a scratch folder that cleans itself up automatically when I'm done"),
    ("tempfile", ".. function:: NamedTemporaryFile(", "a temporary file with a real name on disk so another program can open it"),
    ("tempfile", ".. function:: mkstemp(", "securely create a temp file, get its low-level handle and path, and delete it myself later"),
    ("subprocess", ".. function:: run(", "start an external command, wait for it, and capture what it prints"),
    ("subprocess", ".. method:: Popen.communicate(", "send input to a child process and read all its output without a deadlock"),
    ("subprocess", ".. function:: check_output(", "get a shell command's output as a string and raise if it fails"),
    ("subprocess", "Security Considerations", "is it dangerous to pass user input to a command run with shell=True?"),
    ("time", ".. function:: perf_counter(", "the most precise clock for measuring how long a short piece of code takes"),
    ("time", ".. function:: monotonic(", "a clock that never goes backwards even if someone changes the system time"),
    ("time", ".. function:: strftime(", "format a date and time as text like 2024-01-31 12:00"),
    ("time", ".. function:: sleep(", "pause my program for half a second"),
    ("time", ".. function:: process_time(", "CPU time my process has used, not counting time spent sleeping"),
    ("re", ".. function:: sub(", "replace every match of a pattern in a string with something else"),
    ("re", ".. function:: findall(", "get all non-overlapping matches of a pattern as a list of strings"),
    ("re", ".. function:: fullmatch(", "check that the entire string matches a pattern, not just its start"),
    ("re", ".. data:: I", "make a pattern match letters whether they are upper or lower case"),
    ("re", ".. function:: escape(", "my pattern contains user text with dots and brackets; how do I make it match literally?"),
    ("re", "search() vs. match()", "why does my regex only find things at the very beginning of the string?"),
    ("csv", ".. class:: DictReader(", "read a spreadsheet export whose first row holds column names, getting each row as a dict"),
    ("csv", ".. class:: Sniffer(", "detect automatically whether a file uses commas or semicolons as separators"),
    ("csv", ".. function:: writer(", "save rows of values to a comma separated file"),
    ("difflib", ".. function:: get_close_matches(", "suggest the most similar word from a list when the user makes a typo"),
    ("difflib", ".. function:: unified_diff(", "show the differences between two versions of a text the way git diff does"),
    ("fnmatch", ".. function:: fnmatch(", "does a filename match a shell wildcard like *.txt?"),
    ("pickle", ".. function:: dumps(", "turn a Python object into bytes so I can store it and get it back later"),
    ("pickle", ".. warning::", "is it safe to load a pickle file someone sent me?"),
    ("pickle", "Comparison with ``json``", "what are the differences between this serialization format and JSON?"),
    ("struct", ".. function:: calcsize(", "how many bytes does a binary record layout take up?"),
    ("struct", "Byte Order, Size, and Alignment", "how do I say whether binary data is little-endian or big-endian?"),
    ("codecs", ".. data:: BOM", "what are the magic bytes at the start of some UTF-16 files?"),
    ("unicodedata", ".. function:: normalize(", "make accented characters compare equal whether they are composed or decomposed"),
    ("unicodedata", ".. function:: name(", "get the official name of a character, like LATIN SMALL LETTER A"),
    ("inspect", ".. function:: signature(", "find out at runtime which parameters a function accepts"),
    ("inspect", ".. function:: getsource(", "print the source code of a function from inside my program"),
    ("inspect", ".. function:: getmembers(", "list every attribute of an object together with its value"),
    ("signal", ".. function:: signal(", "run my own code when the process receives Ctrl-C or a termination request"),
    ("signal", ".. function:: alarm(", "ask the operating system to interrupt me after a number of seconds"),
    ("threading", ".. class:: Lock(", "stop two threads from changing shared data at the same time"),
    ("threading", ".. class:: Event(", "make one thread wait until another one tells it to go ahead"),
    ("threading", ".. class:: Timer(", "call a function after a delay in the background"),
    ("logging", ".. function:: basicConfig(", "quickest way to get log messages printed to the console with a chosen format"),
    ("logging", ".. function:: exception(", "log an error together with its traceback inside an except block"),
    ("socket", ".. function:: create_connection(", "open a TCP connection to a host and port with a timeout"),
    ("socket", ".. function:: gethostname(", "what's the network name of this computer?"),
    ("sys", ".. data:: argv", "read the arguments that were given to my script on the command line"),
    ("sys", ".. function:: getsizeof(", "how many bytes of memory does an object take?"),
    ("sys", ".. function:: setrecursionlimit(", "my deeply recursive function crashes; how do I allow more nested calls?"),
    ("sys", ".. data:: path", "where does Python look for modules when I import something?"),
    ("functions", ".. function:: enumerate(", "loop over a list and also get the position of each item"),
    ("functions", ".. function:: sorted(", "get a new ordered list from any iterable without changing the original"),
    ("functions", ".. function:: isinstance(", "check whether an object is of some type or one of its subclasses"),
    ("functions", ".. function:: zip(", "iterate over two lists side by side"),
    ("functions", ".. function:: divmod(", "get the quotient and the remainder in one step"),
    ("functions", ".. function:: round(", "round a number to two decimal places"),
    ("locale", ".. function:: setlocale(", "switch my program to the user's regional settings for numbers and dates"),
    ("locale", ".. function:: currency(", "format a number as money according to local conventions"),
    ("gettext", ".. function:: ngettext(", "translate a message that needs different wording for one item and for many"),
    ("faq/programming", "How do I share global variables across modules?",
     "several of my files need the same configuration values; what's the usual way to share them?"),
    ("faq/programming", "Why are default values shared between objects?",
     "my function's list argument keeps growing every time I call it, why?"),
    ("faq/programming", "How can I find the methods or attributes of an object?",
     "how can I see everything I can call on some object?"),
    ("faq/programming", "How do I convert a string to a number?", "turn the text '144' into an integer"),
    ("faq/programming", "What is the most efficient way to concatenate many strings together?",
     "building a big string piece by piece in a loop is slow; what should I do instead?"),
    ("faq/programming", "How do you remove duplicates from a list?", "drop the repeated elements from my list"),
    ("faq/programming", "Why am I getting an UnboundLocalError when the variable has a value?",
     "reading a variable defined outside my function fails once I also assign to it later in the function"),
    ("faq/programming", "How do I copy an object in Python?", "duplicate a dictionary so that changing one doesn't change the other"),
    ("faq/programming", 'Is there an equivalent of C\'s "?:" ternary operator?',
     "write an if/else that picks a value in a single expression"),
    ("faq/programming", "How do I create a multidimensional list?",
     "I made a grid with [[0] * 3] * 3 and changing one cell changes a whole column"),
    ("faq/programming", "How can I sort one list by values from another list?",
     "order one list according to the values in a second list"),
    ("faq/design", "Why is there no goto?", "can I jump to a label like in C?"),
    ("faq/design", "Why are floating-point calculations so inaccurate?", "0.1 + 0.2 is not 0.3, is Python broken?"),
    ("faq/design", "Why does Python use indentation for grouping of statements?",
     "why doesn't the language use curly braces around blocks?"),
    ("faq/library", "How do I delete a file? (And other file questions...)", "remove a file from disk from my code"),
    ("faq/library", "How do I read (or write) binary data?", "parse a file of packed binary records written by a C program"),
    ("faq/library", "None of my threads seem to run: why?", "my worker threads never do anything before the program exits"),
    ("faq/windows", "How do I make an executable from a Python script?",
     "give my script to Windows users who don't have Python installed"),
]  # fmt: skip


def span(text: str, anchor: str) -> tuple[int, int]:
    """(start, end) of the entry or section that begins with `anchor` at a line start."""
    boundary = r"(?!\w)" if anchor[-1].isalnum() else ""  # `environ` is not `environb`
    starts = [m.start() for m in re.finditer("^[ \t]*" + re.escape(anchor) + boundary, text, re.M)]
    if len(starts) != 1:
        raise ValueError(f"anchor {anchor!r} found {len(starts)} times")
    lines = text[starts[0] :].split("\n")
    first = lines[0]
    if len(lines) > 1 and ADORNMENT.match(lines[1]):  # a title: up to the next title
        offset, i = len(first) + len(lines[1]) + 2, 2
        while i + 1 < len(lines) and not (lines[i].strip() and ADORNMENT.match(lines[i + 1])):
            offset += len(lines[i]) + 1
            i += 1
        return starts[0], starts[0] + offset
    indent = len(first) - len(first.lstrip())
    offset = len(first) + 1
    for line in lines[1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent and not line.lstrip().startswith(".. index::"):
            break
        offset += len(line) + 1
    return starts[0] + len(first) - len(first.lstrip()), starts[0] + offset


def main() -> None:
    for i, (name, anchor, question) in enumerate(QUESTIONS):
        file = f"{name}.rst.txt" if "/" in name else f"library/{name}.rst.txt"
        text = (DOCS / file).read_text()
        start, end = span(text, anchor)
        record = {"id": f"p{i:03d}", "kind": "paraphrase", "question": question, "file": file, "start": start,
                  "end": end, "answer": None, "anchor": text[start : start + 40],
                  "split": "dev" if i % 5 == 0 else "test"}  # fmt: skip
        sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{len(QUESTIONS)} questions", file=sys.stderr)


if __name__ == "__main__":
    main()
