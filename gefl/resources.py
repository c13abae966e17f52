"""The files shipped inside the package (the repository's configs/ folder, installed as the package
data of `gefl.configs`), found with importlib.resources so that every command works from an
installed wheel as well as from a checkout.

A file the user names always wins: `resolve()` takes a path that exists as it is, and only a name
that is not a file here is looked up among the shipped ones (`--config paper/fmnist-fedavg.yaml`
works from any directory).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from gefl.errors import GeflError

PACKAGE = "gefl.configs"


def packaged(name: str) -> Path:
    """The shipped file `name` ("tiers.yaml", "paper/fmnist-fedavg.yaml", "mosquitto/acl")."""
    # Wheels install unpacked, so the package's files are real files: a Path is what callers need
    # (for error messages, for subprocesses such as mosquitto -c).
    return Path(str(resources.files(PACKAGE).joinpath(name)))


def shipped_configs() -> list[str]:
    """Names of the experiment configs that ship with the package, as `resolve()` accepts them."""
    root = packaged("")
    catalogues = {"tiers.yaml", "devices.yaml"}
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.yaml") if p.name not in catalogues)


def resolve(given: str | Path, what: str) -> Path:
    """`given` if it is a file; else the shipped file of that name (".yaml" may be left off);
    else an error naming both places and the shipped choices."""
    path = Path(given)
    if path.is_file():
        return path
    if not path.is_absolute():
        for name in (str(given), f"{given}.yaml"):
            candidate = packaged(name)
            if candidate.is_file():
                return candidate
    choices = ", ".join(shipped_configs())
    raise GeflError(f"{what} {given} does not exist, here or among the files gefl-edge ships ({choices})")
