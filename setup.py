"""Build and install fastresnet. The top-level kernels/ folder installs as the subpackage fastresnet.kernels."""
from setuptools import find_packages, setup

setup(
    name="fastresnet",
    version="0.1.0",
    description="Fused BN-ReLU-conv kernels, model zoo and trainer for pre-activation ResNets (He et al., ECCV 2016)",
    python_requires=">=3.11",
    packages=find_packages(include=["fastresnet", "fastresnet.*"]) + ["fastresnet.kernels"],
    package_dir={"fastresnet.kernels": "kernels"},
    install_requires=["torch>=2.11", "triton>=3.6; platform_system=='Linux'", "numpy"],
    entry_points={"console_scripts": ["fastresnet=fastresnet.cli:main"]},
    extras_require={
        "test": ["pytest", "pytest-benchmark", "ninja", "pybind11", "scikit-learn", "matplotlib"],
        "train": ["scikit-learn", "matplotlib"],
    },
)
