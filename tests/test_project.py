"""The project's own conventions, checked so that they stay so: what a wheel ships, the width of the code."""
import subprocess
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 120


def test_every_package_ships_in_the_wheel():
    """A board installs a wheel, not the checkout: a subpackage missing from the list would exist only in
    editable installs (edgekit.units and edgekit.apps once were)."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool["package-dir"]

    def directory(package: str) -> Path:
        top = max((d for d in dirs if package == d or package.startswith(d + ".")), key=len)
        return (ROOT / dirs[top] / package[len(top) + 1:].replace(".", "/")).resolve()

    on_disk = {p.parent.resolve() for d in dirs.values() for p in (ROOT / d).rglob("__init__.py")}
    missing = on_disk - {directory(name) for name in tool["packages"]}
    assert not missing, f"packages not in pyproject.toml's list: {sorted(str(m.relative_to(ROOT)) for m in missing)}"


def test_no_python_line_is_wider_than_120_characters():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    wide = [f"{name}:{i}" for name in files.split() for i, line in
            enumerate((ROOT / name).read_text().splitlines(), 1) if len(line) > WIDTH]
    assert not wide, f"lines over {WIDTH} characters: {', '.join(wide)}"
