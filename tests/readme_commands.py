"""The `rglf ...` command lines of README.md's bash blocks, parsed (continuations joined)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_rglf_commands(readme: Path = README) -> list[list[str]]:
    """Every README bash-block line that runs ``rglf``, as argv (without the ``rglf``)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme.read_text(), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)  # backslash continuations
        # a quoted argument may span lines (the SQL examples): split the whole block, then cut at newlines
        # that are outside quotes by re-splitting line by line where the quote count is balanced
        line = ""
        for raw in joined.splitlines():
            line = f"{line}\n{raw}" if line else raw
            try:
                argv = shlex.split(line, comments=True)
            except ValueError:  # unbalanced quote: the argument goes on on the next line
                continue
            if argv and argv[0] == "rglf":
                commands.append(argv[1:])
            line = ""
    return commands
