"""The README's snippets run as written, so that a new user's first steps work.

Its ```python blocks run here, in order, in one namespace. Its ```bash
commands are read by the same parser: ``python tests/test_readme.py demo``
prints the demo command, which ``.ci/run`` runs verbatim in a fresh clone
with a new virtual environment (too slow for the test suite: it builds the
extensions).
"""

import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")

# Each bash command that .ci/run runs, found by a text only it contains.
COMMANDS = {"demo": "python -m annlearn", "test": "python -m pytest"}


def readme_blocks(language, path=README):
    """Text of the fenced code blocks of ``language`` in ``path``, in order."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.DOTALL | re.MULTILINE)


def readme_command(name, path=README):
    """The one bash block of the README that contains ``COMMANDS[name]``."""
    blocks = [b.strip() for b in readme_blocks("bash", path) if COMMANDS[name] in b]
    if len(blocks) != 1:
        raise ValueError(
            f"Expected one bash block containing {COMMANDS[name]!r} in {path}, "
            f"found {len(blocks)}."
        )
    return blocks[0]


def test_python_snippets_run_in_order():
    snippets = readme_blocks("python")
    assert len(snippets) >= 3
    namespace = {"__name__": "__readme__"}
    for i, snippet in enumerate(snippets):
        exec(compile(snippet, f"README.md python block {i + 1}", "exec"), namespace)


def test_bash_commands_are_found():
    assert readme_command("demo").endswith("python -m annlearn")
    assert "--doctest-modules" in readme_command("test")


def test_parser_reads_fences_only(tmp_path):
    import pytest  # here, not at the top: .ci/run runs this file before pytest

    readme = tmp_path / "README.md"
    readme.write_text(
        "```bash\npython -m annlearn\n```\n"
        "not code: ```bash\n"
        "```python\nx = 1\n```\n"
        "```bash\necho python -m annlearn\n```\n"
    )
    assert readme_blocks("python", readme) == ["x = 1\n"]
    assert len(readme_blocks("bash", readme)) == 2
    with pytest.raises(ValueError, match="found 2"):
        readme_command("demo", readme)


if __name__ == "__main__":
    # Used by .ci/run: print the README's command named on the command line.
    print(readme_command(sys.argv[1]))
