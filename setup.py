"""Build script: the package plus its Cython hot paths.

Every ``ext/NAME.pyx`` is compiled into ``mta._ext.NAME``.  Each compiled
module has a pure-Python twin ``mta._pure.NAME`` with the same public API;
``mta.native`` chooses between them (``MTA_PUREPYTHON=1`` forces the twins).
Generated ``.c`` files are build products and are not committed.
"""
import glob
import os

from setuptools import Extension, find_packages, setup

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - Cython is a build requirement
    raise SystemExit("Cython is required to build mta: pip install cython")


def extensions():
    mods = []
    for pyx in sorted(glob.glob(os.path.join("ext", "*.pyx"))):
        name = os.path.splitext(os.path.basename(pyx))[0]
        mods.append(
            Extension(
                "mta._ext." + name,
                [pyx],
                extra_compile_args=["-O2"],
            )
        )
    return cythonize(
        mods,
        language_level=3,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
        },
    )


setup(
    name="mta",
    version="0.1.0",
    description="High-volume outbound Mail Transfer Agent",
    packages=find_packages(include=["mta", "mta.*"]),
    python_requires=">=3.11",
    ext_modules=extensions(),
    install_requires=[
        "uvloop>=0.19",
        "pyzmq>=25",
        "msgpack>=1.0",
        "msgspec>=0.18",
        "click>=8.1",
        "setproctitle>=1.3",
        "dnspython>=2.6",
        "cryptography>=41",
        "dkimpy>=1.1",
        "pynacl>=1.5",
        "orjson>=3.9",
        "httptools>=0.6",
        "idna>=3.6",
    ],
    extras_require={
        "test": [
            "Cython>=3.0",
            "pytest>=8",
            "pytest-timeout>=2.2",
            "pytest-benchmark>=4",
            "hypothesis>=6.100",
            "aiosmtpd>=1.4",
            "aiosmtplib>=3",
            "trustme>=1.1",
            "sparkpost>=1.3",
            "ruff>=0.5",
        ],
    },
    entry_points={"console_scripts": ["mta = mta.cli:main"]},
)
