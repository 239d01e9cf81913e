"""The width the project's code is written to, checked so that it stays so."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 120


def test_no_python_line_is_wider_than_120_characters():
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    wide = [f"{name}:{i}" for name in files.split() for i, line in
            enumerate((ROOT / name).read_text().splitlines(), 1) if len(line) > WIDTH]
    assert not wide, f"lines over {WIDTH} characters: {', '.join(wide)}"
