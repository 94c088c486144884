"""mpitrain: data-parallel and federated neural-network training over MPI."""
from setuptools import find_packages, setup

# kernels/ is the top-level source folder of the Numba kernels; it is installed as the subpackage
# mpitrain.kernels (the top-level name `kernels` belongs to another PyPI project).  mpitrain/kernels is a
# relative symlink to it, so a source checkout imports exactly what a wheel installs.
setup(
    name="mpitrain",
    version="0.1.0",
    description="Data-parallel and federated neural-network training over MPI (mpi4py + Numba + HDF5)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mpitrain", "mpitrain.*"]),
    install_requires=[
        "mpi4py>=4.0",
        "numpy>=1.24",
        "numba>=0.60",
        "scipy>=1.10",  # secure aggregation plans its threshold with scipy.stats; Numba loads scipy.linalg
        "h5py>=3.8",
        "scikit-learn>=1.3",  # the embedded default dataset (handwritten digits)
        "pillow>=9.1",  # prepare --source images:DIR decodes PNG/JPEG (9.1: Image.Resampling)
        "threadpoolctl>=3.1",
        "tqdm>=4.60",
        "cryptography>=41",  # secure aggregation: X25519, HKDF, ChaCha20
        "dp-accounting>=0.4",  # differential privacy: RDP accountant
        "tomli>=2.0; python_version < '3.11'",
    ],
    extras_require={
        # The MPICH wheel brings libmpi, mpiexec and mpirun; leave it out to use the site MPI (README).
        "mpi": ["mpich>=4.3"],
        # plot and bench scaling PNGs, CKKS and export are tested
        "test": ["pytest>=7", "matplotlib>=3.5", "tenseal>=0.3", "onnx>=1.14", "onnxruntime>=1.16",
                 "tensorboardX>=2.6", "tensorboard>=2.12"],  # tensorboard: its reader checks the event files
        "tensorboard": ["tensorboardX>=2.6"],  # train.log = ["tensorboard"]
        "he": ["tenseal>=0.3"],  # fed.encryption = "ckks": CKKS homomorphic encryption (TenSEAL / Microsoft SEAL)
        "bench": ["matplotlib>=3.5"],  # PNG plots of bench scaling and bench leakage
        "cuda": ["numba-cuda>=0.20"],  # --set train.device=cuda
        "peers": ["torch>=2.1", "flwr>=1.42,<2"],  # bench peers: PyTorch DDP and Flower
        "export": ["onnx>=1.14", "onnxruntime>=1.16"],  # export --format onnx (onnxruntime: to run it)
    },
    entry_points={"console_scripts": ["mpitrain=mpitrain.cli:main"]},
)
