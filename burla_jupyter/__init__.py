"""Burla in Jupyter.

- IPython: the %%burla and %burla magics and the live job widget (`%load_ext burla` or `%load_ext burla_jupyter`).
- Jupyter Server: the endpoints of the JupyterLab panel (routes.py), fed by a watcher of the broker (manager.py).
- JupyterLab: the panel itself is the labextension/ folder, built into burla_jupyter/labextension.
"""


def load_ipython_extension(ipython):
    from burla_jupyter.magics import BurlaMagics

    ipython.register_magics(BurlaMagics)


def _jupyter_server_extension_points():
    return [{"module": "burla_jupyter"}]


def _load_jupyter_server_extension(server_app):
    from burla_jupyter.routes import setup_handlers

    setup_handlers(server_app.web_app)
    server_app.log.info("burla: the JupyterLab panel's endpoints are at /burla/")


def _jupyter_labextension_paths():
    return [{"src": "labextension", "dest": "burla-labextension"}]
