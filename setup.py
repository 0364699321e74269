from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def read_version() -> str:
    for line in (HERE / "libqmpbackup" / "__init__.py").read_text().splitlines():
        if line.startswith("__version__"):
            return line.split('"')[1]
    raise RuntimeError("no __version__ in libqmpbackup/__init__.py")


setup(
    name="qmpbackup",
    version=read_version(),
    description="Live full and incremental backups of running QEMU VMs over QMP",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="GPL-3.0-or-later",
    python_requires=">=3.9",
    packages=find_packages(include=["libqmpbackup", "libqmpbackup.*", "qmpbackup", "qmprestore"]),
    package_data={"libqmpbackup": ["py.typed"]},
    install_requires=[line.strip() for line in (HERE / "requirements.txt").read_text().splitlines()
                      if line.strip() and not line.startswith("#")],
    entry_points={"console_scripts": [
        "qmpbackup = qmpbackup.cli:main",
        "qmprestore = qmprestore.cli:main",
    ]},
    classifiers=[
        "License :: OSI Approved :: GNU General Public License v3 or later (GPLv3+)",
        "Programming Language :: Python :: 3",
        "Topic :: System :: Archiving :: Backup",
    ],
)
