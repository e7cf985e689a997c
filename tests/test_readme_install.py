"""The README's install line works for a newcomer: `make package` runs it as written in a fresh venv (through
scripts/readme_install.py); these tests check what that run cannot: that the line installs from the checkout or a
wheel (keras-lsuv is not on PyPI yet, so `pip install "keras-lsuv[jax]"` finds nothing), and that the script fails
rather than run nothing."""

import importlib.util
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "readme_install.py"


@pytest.fixture(scope="module")
def readme_install():
    spec = importlib.util.spec_from_file_location("readme_install", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_installs_from_the_checkout_and_make_package_runs_that_line(readme_install):
    line = readme_install.install_line((ROOT / "README.md").read_text(encoding="utf-8"))
    words = shlex.split(line, comments=True)
    assert words[:2] == ["pip", "install"], line
    requirement = words[-1]
    assert requirement.startswith((".", "/")) or ".whl" in requirement, f"{requirement}: not on PyPI yet"
    assert readme_install.install_line((ROOT / "docs" / "index.md").read_text(encoding="utf-8")) == line
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    package = makefile[makefile.index("\npackage:") :].split("\n\n")[0]
    assert "scripts/readme_install.py README.md" in package and 'sh -c "$$line"' in package


@pytest.mark.parametrize(
    "readme, reason",
    [
        ("# keras-lsuv\n\nText.\n", "no '## Install' heading"),
        ("## Install\n\nFrom PyPI.\n\n## Next\n\n```bash\npip install x\n```\n", "no ```bash block"),
        ("## Install\n\n```bash\nmake demo\n```\n", "no `pip install` line"),
    ],
)
def test_a_readme_without_an_install_line_is_an_error(readme_install, readme, reason):
    with pytest.raises(ValueError, match=reason):
        readme_install.install_line(readme)
