"""Builds the optional CPU kernel ``ml._tanh_mlp`` (metadata lives in pyproject.toml).

Without a C++ compiler with OpenMP the build is skipped with a warning and training
takes the plain torch backward (see ``ml/dense.py``).
"""

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[CppExtension(
        "ml._tanh_mlp", ["ml/csrc/tanh_mlp.cpp"],
        # OpenMP for at::parallel_for; at run time it resolves to the libgomp torch has loaded.
        extra_compile_args=["-O3", "-fopenmp"], extra_link_args=["-fopenmp"], optional=True)],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
