"""Build hook: compiles native/ into the optional extension hsmbridge._native.

The extension is optional: when no C compiler is available the package still
installs and hsmbridge falls back to its pure-Python batch path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "hsmbridge._native",
            sources=["native/batch.c"],
            include_dirs=["native"],
            extra_compile_args=["-O2", "-std=c11", "-Wall"],
            libraries=["dl", "pthread"],
            optional=True,
        )
    ]
)
