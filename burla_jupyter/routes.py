"""HTTP and WebSocket endpoints of the panel, under {base_url}/burla/. Every one requires Jupyter's authentication.

    GET  state                  the cluster (address, connected, embedded) and the broker's state
    GET  jobs/ID/logs           the log lines kept for a job, {lines: [[worker, stream, text], ...], total}
    GET  jobs/ID/history        what the panel draws of a job: its time series, timeline bars and failures
    POST cluster                {"action": "start" | "stop"}: the embedded cluster of this server
    POST jobs/ID/cancel         cancel a job
    WS   events                 pushes {"type": "state", ...} as the broker sends it, and {"type": "logs", ...}
"""

import json

import tornado
from jupyter_server.base.handlers import APIHandler, JupyterHandler
from jupyter_server.base.websocket import WebSocketMixin
from jupyter_server.utils import url_path_join
from tornado.websocket import WebSocketHandler

from burla_jupyter.manager import Manager


class Base(APIHandler):
    @property
    def manager(self):
        return self.settings["burla_manager"]


class StateHandler(Base):
    @tornado.web.authenticated
    def get(self):
        self.finish(json.dumps(self.manager.snapshot()))


class LogsHandler(Base):
    @tornado.web.authenticated
    def get(self, job_id):
        self.finish(json.dumps({"job": job_id, **self.manager.job_logs(job_id)}))


class HistoryHandler(Base):
    @tornado.web.authenticated
    def get(self, job_id):
        self.finish(json.dumps({"job": job_id, **self.manager.job_history(job_id)}))


class ClusterHandler(Base):
    @tornado.web.authenticated
    def post(self):
        action = (self.get_json_body() or {}).get("action")
        try:
            if action == "start":
                cluster = self.manager.start_embedded()
            elif action == "stop":
                cluster = self.manager.stop_embedded()
            else:
                raise tornado.web.HTTPError(400, "action must be 'start' or 'stop'")
        except ValueError as e:
            raise tornado.web.HTTPError(409, str(e)) from None
        self.finish(json.dumps({"cluster": cluster}))


class CancelHandler(Base):
    @tornado.web.authenticated
    def post(self, job_id):
        try:
            self.manager.cancel(job_id)
        except KeyError:
            raise tornado.web.HTTPError(404, f"no running job {job_id}") from None
        except ValueError as e:
            raise tornado.web.HTTPError(400, str(e)) from None
        self.finish(json.dumps({"cancelled": job_id}))


class EventsHandler(WebSocketMixin, WebSocketHandler, JupyterHandler):
    """Pushes the manager's messages to one page. Messages come from the manager's thread: they are handed to the
    server's event loop, which owns the connection."""

    async def get(self, *args, **kwargs):
        if self.current_user is None:
            raise tornado.web.HTTPError(403)
        return await super().get(*args, **kwargs)

    def open(self, *args, **kwargs):
        super().open(*args, **kwargs)  # Jupyter's keep-alive pings: a page that vanished is noticed and dropped
        self.loop = tornado.ioloop.IOLoop.current()
        self.manager = self.settings["burla_manager"]
        self.write_message(json.dumps(self.manager.snapshot()))
        self.manager.subscribe(self.push)

    def push(self, text):
        self.loop.add_callback(self.send, text)

    def send(self, text):
        try:
            self.write_message(text)
        except tornado.websocket.WebSocketClosedError:
            self.manager.unsubscribe(self.push)

    def on_message(self, message):
        pass  # the page only listens

    def on_close(self):
        self.manager.unsubscribe(self.push)


def setup_handlers(web_app):
    web_app.settings["burla_manager"] = Manager()
    base = url_path_join(web_app.settings["base_url"], "burla")
    web_app.add_handlers(".*$", [
        (url_path_join(base, "state"), StateHandler),
        (url_path_join(base, "cluster"), ClusterHandler),
        (url_path_join(base, r"jobs/([0-9a-f]+)/logs"), LogsHandler),
        (url_path_join(base, r"jobs/([0-9a-f]+)/history"), HistoryHandler),
        (url_path_join(base, r"jobs/([0-9a-f]+)/cancel"), CancelHandler),
        (url_path_join(base, "events"), EventsHandler),
    ])
