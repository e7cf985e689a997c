"""scripts/lowest_requirements.py pins what setup.cfg declares, per Python version (`make test-min` uses it)."""

import importlib.util
from pathlib import Path

import pytest
from packaging.requirements import Requirement

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "lowest_requirements.py"
spec = importlib.util.spec_from_file_location("lowest_requirements", SCRIPT)
lowest_requirements = importlib.util.module_from_spec(spec)
spec.loader.exec_module(lowest_requirements)

SETUP_CFG = """
[options]
install_requires =
    keras>=3.5
    numpy>=1.24; python_version < "3.12"
    numpy>=1.26; python_version >= "3.12"

[options.extras_require]
jax =
    jax>=0.4.30
torch =
    torch>=2.2
"""


@pytest.mark.parametrize("python_version, numpy", [("3.11", "1.24"), ("3.12", "1.26")])
def test_pins_the_lower_bounds_whose_markers_hold(tmp_path, python_version, numpy):
    setup_cfg = tmp_path / "setup.cfg"
    setup_cfg.write_text(SETUP_CFG)
    requirements = lowest_requirements.declared_requirements(["jax"], setup_cfg)
    pins = lowest_requirements.lowest_pins(requirements, python_version)
    assert pins == ["keras==3.5", f"numpy=={numpy}", "jax==0.4.30"]


def test_every_requirement_of_the_package_and_its_backends_has_a_lower_bound():
    for extras in (["jax"], ["tensorflow"], ["torch"]):
        pins = lowest_requirements.lowest_pins(lowest_requirements.declared_requirements(extras))
        assert [pin.split("==")[0] for pin in pins][:2] == ["keras", "numpy"]


def test_a_requirement_without_lower_bound_is_an_error():
    with pytest.raises(SystemExit, match="needs exactly one '>=' lower bound"):
        lowest_requirements.lowest_pins([Requirement("keras<4")])
