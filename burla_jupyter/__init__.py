"""Burla in Jupyter: the %%burla and %burla magics and the live job widget (load with `%load_ext burla` or
`%load_ext burla_jupyter`)."""


def load_ipython_extension(ipython):
    from burla_jupyter.magics import BurlaMagics

    ipython.register_magics(BurlaMagics)
