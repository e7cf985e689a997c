"""Prints pip constraints pinning each requirement of setup.cfg to its declared lower bound.

Run: python scripts/lowest_requirements.py jax --python-version 3.11 > constraints.txt   (`make test-min` does)

Reads `install_requires` and the given extras (e.g. a backend) from setup.cfg, keeps the requirements whose
environment markers hold for the given Python version (default: the running one), and turns each
`name>=version` into `name==version`, so that `make test-min` installs exactly the oldest versions the package
claims to support. A requirement without a lower bound is an error: every dependency must declare one.
"""

import argparse
import configparser
from pathlib import Path

from packaging.requirements import Requirement

SETUP_CFG = Path(__file__).resolve().parent.parent / "setup.cfg"


def declared_requirements(extras, setup_cfg=SETUP_CFG):
    config = configparser.ConfigParser()
    config.read(setup_cfg)
    lines = config["options"]["install_requires"].splitlines()
    for extra in extras:
        lines += config["options.extras_require"][extra].splitlines()
    return [Requirement(line) for line in lines if line.strip()]


def lowest_pins(requirements, python_version=None):
    environment = {"python_version": python_version} if python_version else None
    pins = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        lower = [spec.version for spec in requirement.specifier if spec.operator == ">="]
        if len(lower) != 1:
            raise SystemExit(f"setup.cfg: {requirement} needs exactly one '>=' lower bound")
        pins.append(f"{requirement.name}=={lower[0]}")
    return pins


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", nargs="*", help="extras of setup.cfg to include, e.g. jax")
    parser.add_argument("--python-version", help="major.minor of the Python the pins are for (default: this one)")
    args = parser.parse_args(argv)
    print("\n".join(lowest_pins(declared_requirements(args.extras), args.python_version)))


if __name__ == "__main__":
    main()
