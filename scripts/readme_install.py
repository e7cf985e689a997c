"""Prints the install line of README.md as written, for `make package` to run in a fresh venv.

The line is the first `pip install` line of the first ```bash block under the README's "## Install" heading. A
README without one is an error (exit status 1, with the reason), so the smoke test cannot pass on a line it did not
run.

Run: python scripts/readme_install.py README.md
"""

import sys
from pathlib import Path

HEADING = "## Install"


def install_line(readme: str) -> str:
    """The README's install line, as written (a shell runs it, comment included).

    Args:
        readme: The text of README.md.

    Returns:
        The first line starting with `pip install` in the first ```bash block of the "## Install" section, stripped.

    Raises:
        ValueError: If the section, its block or the line is missing.
    """
    lines = readme.splitlines()
    if HEADING not in lines:
        raise ValueError(f"no '{HEADING}' heading")
    section = lines[lines.index(HEADING) + 1 :]
    section = section[: next((i for i, line in enumerate(section) if line.startswith("## ")), len(section))]
    if "```bash" not in section:
        raise ValueError(f"no ```bash block under '{HEADING}'")
    block = section[section.index("```bash") + 1 :]
    block = block[: block.index("```")] if "```" in block else block
    for line in block:
        if line.strip().startswith("pip install"):
            return line.strip()
    raise ValueError(f"no `pip install` line in the ```bash block under '{HEADING}'")


def main() -> None:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    try:
        print(install_line(path.read_text(encoding="utf-8")))
    except ValueError as error:
        sys.exit(f"{path}: {error}")


if __name__ == "__main__":
    main()
