"""Which folders make up the `llmserve` packages; everything else is in pyproject.toml.

`llmserve.X` lives in top-level folders, a mapping `packages.find` cannot express, and a list
kept by hand once left out `llmserve.engine_service.parallel`. So every folder under each root
is found here, with or without an `__init__.py`.
"""

from setuptools import find_namespace_packages, setup

ROOTS = {
    "llmserve.v1": "proto/llmserve/v1",
    "llmserve.common": "common",
    "llmserve.clients": "clients",
    "llmserve.router": "router",
    "llmserve.engine_service": "engine_service",
    "llmserve.kernels": "kernels",
}

setup(
    package_dir=ROOTS,
    packages=[
        name
        for package, root in ROOTS.items()
        for name in [
            package,
            *(
                f"{package}.{sub}"
                for sub in find_namespace_packages(root, exclude=["__pycache__", "*.__pycache__"])
            ),
        ]
    ],
)
