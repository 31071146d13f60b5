"""IPython magics.

    %%burla x in my_inputs -> results        run the cell once per input, x bound to it; the cell's last
                                              expression is that call's result; the list lands in `results`
    %%burla --cpu 2 --parallelism 8 x in ...  options: --cpu --ram --gpu --parallelism --retries --timeout --cluster
    %%burla -> answer                         run the whole cell once on the cluster
    %burla status [CLUSTER]                   the cluster: workers, slots, running jobs
    %burla jobs [CLUSTER]                     this API key's jobs: running, detached, recently ended
    %burla attach JOB_ID -> results           a job started elsewhere (detach=True, another kernel, before a
                                              restart): its live view in this cell, then its results in input order
    %burla attach --cluster ADDRESS --timeout S JOB_ID

Without `-> name` the results are the cell's value (shown as Out). Names the cell uses from the notebook travel
with it like a closure's; names it assigns stay on the worker. A job id may be shortened to a prefix that only one
of this key's jobs has (the panel shows the first 8 digits). Interrupting `%burla attach` stops reading: the job
itself goes on.
"""

import ast
import html
import re

from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.display import HTML

OPTIONS = {  # --name: (remote_parallel_map argument, type)
    "cpu": ("func_cpu", float), "ram": ("func_ram", float), "gpu": ("func_gpu", str),
    "parallelism": ("max_parallelism", int), "retries": ("retries", int), "timeout": ("timeout", float),
    "cluster": ("cluster", str),
}
LINE_OPTIONS = {  # the line magic's --name: (argument, type)
    "cluster": ("cluster", str), "timeout": ("timeout", float),
}
USAGE = ("usage: %%burla [--cpu N] [--ram GB] [--gpu SPEC] [--parallelism N] [--retries N] [--timeout S] "
         "[--cluster ADDRESS] [TARGET in ITERABLE] [-> NAME]")
LINE_USAGE = ("usage: %burla status [CLUSTER] | %burla jobs [CLUSTER] | "
              "%burla attach [--cluster ADDRESS] [--timeout S] JOB_ID [-> NAME]")


class UsageError(ValueError):
    """A mistake in how a magic was called: shown as its message alone, as IPython shows its own UsageError."""

    def _render_traceback_(self):  # (IPython's hook: the lines to show instead of a traceback)
        return [f"UsageError: {self}"]


def split_result_name(line, usage):
    """(the line before `-> NAME`, NAME or None)."""
    if "->" not in line:
        return line, None
    rest, _, name = line.rpartition("->")
    name = name.strip()
    if not name.isidentifier():
        raise UsageError(f"-> must name a variable, not {name!r}\n{usage}")
    return rest, name


def parse(line):
    """(options for remote_parallel_map, loop target or None, iterable expression or None, result name or None)."""
    rest, name = split_result_name(line, USAGE)
    options = {}
    while True:
        m = re.match(r"\s*--([a-z]+)(?:\s*=\s*|\s+)(\S+)", rest)
        if not m:
            break
        if m.group(1) not in OPTIONS:
            raise UsageError(f"unknown option --{m.group(1)}\n{USAGE}")
        argument, kind = OPTIONS[m.group(1)]
        try:
            options[argument] = kind(m.group(2))
        except ValueError:
            raise UsageError(f"--{m.group(1)} takes a {kind.__name__}, not {m.group(2)!r}") from None
        rest = rest[m.end():]
    rest = rest.strip()
    if not rest:
        return options, None, None, name
    m = re.fullmatch(r"(.+?)\s+in\s+(.+)", rest, re.S)
    if not m:
        raise UsageError(f"expected `TARGET in ITERABLE`, got {rest!r}\n{USAGE}")
    target, iterable = m.group(1).strip(), m.group(2).strip()
    try:
        ast.parse(f"for {target} in []: pass")
        ast.parse(iterable, mode="eval")
    except SyntaxError as e:
        raise UsageError(f"{e.msg}: {rest!r}\n{USAGE}") from None
    return options, target, iterable, name


def cell_function(shell, cell, target):
    """The cell as a function of one input: `target = input`, then the cell, returning its last expression. It is
    compiled under the cell's own file name, so tracebacks (remote ones too) show the cell's lines."""
    source = shell.transform_cell(cell)
    tree = ast.parse(source)
    body = tree.body or [ast.Pass()]
    if isinstance(body[-1], ast.Expr):
        body[-1] = ast.Return(body[-1].value)
    if target:
        bind = ast.parse(f"{target} = _burla_input").body[0]
        ast.increment_lineno(bind, -1)  # reported as the cell's first line, not line 1 of something else
        body.insert(0, bind)
    args = ast.arguments(posonlyargs=[], args=[ast.arg("_burla_input")], vararg=None, kwonlyargs=[],
                         kw_defaults=[], kwarg=None, defaults=[ast.Constant(None)])
    function = ast.FunctionDef(name="burla_cell", args=args, body=body, decorator_list=[], returns=None)
    module = ast.fix_missing_locations(ast.Module(body=[function], type_ignores=[]))
    filename = shell.compile.cache(source)
    defined = {}
    exec(compile(module, filename, "exec"), shell.user_ns, defined)  # globals: the notebook's names
    return defined["burla_cell"]


@magics_class
class BurlaMagics(Magics):
    @line_cell_magic
    def burla(self, line, cell=None):
        __tracebackhide__ = True  # a remote error shows the cell's lines, not this magic's
        from burla import remote_parallel_map

        if cell is None:
            return self.line_magic(line)
        options, target, iterable, name = parse(line)
        function = cell_function(self.shell, cell, target)
        function.__qualname__ = f"%%burla {target} in {iterable}" if target else "%%burla"  # (what the job is called)
        if target is None:
            results = remote_parallel_map(function, [None], **options)[0]
        else:
            inputs = eval(iterable, self.shell.user_ns)
            results = remote_parallel_map(function, inputs, **options)
        if name is None:
            return results
        self.shell.user_ns[name] = results
        return None

    def line_magic(self, line):
        __tracebackhide__ = True
        command, options, words, name = parse_line(line)
        if command in ("status", "jobs"):
            if name is not None:
                raise UsageError(f"%burla {command} takes no -> NAME\n{LINE_USAGE}")
            if len(words) > 1 or (words and "cluster" in options) or "timeout" in options:
                raise UsageError(f"%burla {command} [CLUSTER]\n{LINE_USAGE}")
            cluster = words[0] if words else options.get("cluster")
            return status_table(cluster) if command == "status" else jobs_table(cluster)
        if command == "attach":
            if len(words) != 1:
                raise UsageError(f"%burla attach takes one job id\n{LINE_USAGE}")
            job = find_job(words[0], options.get("cluster"))
            results = job.result(timeout=options.get("timeout"), spinner=True)  # the live view, in this cell
            if name is None:
                return results
            self.shell.user_ns[name] = results
            return None
        raise UsageError(f"line magic: {LINE_USAGE}\ncell magic: {USAGE}")


def parse_line(line):
    """The line magic's (command, options, other words, result name or None)."""
    rest, name = split_result_name(line, LINE_USAGE)
    words = rest.split()
    if not words:
        raise UsageError(f"line magic: {LINE_USAGE}\ncell magic: {USAGE}")
    options, positional, i = {}, [], 1
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--"):
            positional.append(word)
            continue
        key, equals, value = word[2:].partition("=")
        if key not in LINE_OPTIONS:
            raise UsageError(f"unknown option --{key}\n{LINE_USAGE}")
        if not equals:
            if i >= len(words):
                raise UsageError(f"--{key} needs a value\n{LINE_USAGE}")
            value, i = words[i], i + 1
        argument, kind = LINE_OPTIONS[key]
        try:
            options[argument] = kind(value)
        except ValueError:
            raise UsageError(f"--{key} takes a {kind.__name__}, not {value!r}") from None
    return words[0], options, positional, name


def local_and_idle(cluster):
    """True where the cluster is this kernel's own embedded one and it is not running: it can have no jobs, and
    asking it would start it for nothing."""
    from burla import config, local

    return config.cluster_address(cluster) == "local" and getattr(local, "_cluster", None) is None


def find_job(key, cluster=None):
    """The burla.Job with that id, or with the one id of this key's jobs that starts with it; UsageError if none."""
    __tracebackhide__ = True
    import burla
    from burla.client import connection

    key = key.strip("'\"").lower()
    if not re.fullmatch(r"[0-9a-f]{1,16}", key):
        raise UsageError(f"a job id is 16 hexadecimal digits (job.id, %burla jobs), not {key!r}")
    try:
        if local_and_idle(cluster):
            raise UsageError(f"no job {key}: no cluster is configured, and this kernel's own local cluster has no "
                             "jobs from elsewhere; give --cluster ADDRESS (or set BURLA_CLUSTER, `burla login`)")
        conn = connection(cluster)
        where = "this kernel's own local cluster" if conn.local else conn.address
        if len(key) < 16:
            matches = [j.id for j in burla.jobs(cluster) if j.id.startswith(key)]
            if not matches:
                raise UsageError(f"no job on {where} has an id starting with {key!r} (%burla jobs lists them)")
            if len(matches) > 1:
                raise UsageError(f"{len(matches)} jobs on {where} have an id starting with {key!r}: "
                                 f"{', '.join(matches)}")
            key = matches[0]
        return burla.attach(key, cluster=cluster)
    except burla.JobNotFoundError:
        raise UsageError(f"no job {key} on {where} for this API key (%burla jobs lists them; an ended detached "
                         "job is kept for its retention, 7 days by default)") from None
    except ValueError as e:  # (a malformed cluster address)
        if isinstance(e, UsageError):
            raise
        raise UsageError(str(e)) from None


def jobs_table(cluster=None):
    """This API key's jobs on the cluster (running, detached, recently ended), newest first, as an HTML table."""
    import burla
    from burla.client import connection

    try:
        if local_and_idle(cluster):
            return Shown("<p>no jobs: no cluster is configured, and this kernel's own local cluster is not "
                         "running</p>", "no jobs: no cluster is configured")
        conn = connection(cluster)
    except ValueError as e:  # (a malformed cluster address)
        raise UsageError(str(e)) from None
    where = f"local cluster {conn.address}" if conn.local else conn.address
    statuses = burla.jobs(cluster)
    rows, lines = [], []
    for j in statuses:
        done = f"{j.done:,} / {j.total:,}" if j.total is not None else f"{j.done:,} / ?"
        state = j.state + (f" ({j.reason})" if j.reason and j.state != "done" else "")
        values = [j.id, state, done, f"{j.failed:,}", f"{j.elapsed:.1f} s", "yes" if j.detached else "no"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in values) + "</tr>")
        lines.append("  ".join(values))
    title = f"<b>burla jobs</b> on {html.escape(where)}: {len(statuses)}"
    if not statuses:
        return Shown(f"{title}<p>no jobs</p>", f"no jobs on {where}")
    head = "".join(f"<th>{h}</th>" for h in ("job", "state", "done / total", "failed", "elapsed", "detached"))
    return Shown(f"{title}<table class=\"burla-jobs\"><tr>{head}</tr>{''.join(rows)}</table>",
                 f"burla jobs on {where}:\n" + "\n".join(lines))


class Shown:
    """Something a magic returns to be shown: HTML in a notebook, text in a terminal."""

    def __init__(self, html_text, text):
        self.html, self.text = html_text, text

    def _repr_html_(self):
        return self.html

    def __repr__(self):
        return self.text


def status_table(cluster=None):
    """The cluster's workers and this client's jobs, as an HTML table."""
    from burla.client import cluster_state, connection

    try:
        conn = connection(cluster)
    except ValueError as e:  # (a malformed cluster address)
        raise UsageError(str(e)) from None
    state = cluster_state(conn.address, api_key=conn.api_key)
    def row(values):
        return "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in values) + "</tr>"

    workers = "".join(row([w["id"], w["host"], w["slots"], w["busy"], w["cpu"], round(w["ram"], 1),
                           ", ".join(w["gpu"]) or "-", w.get("containers") or "-"]) for w in state["workers"])
    jobs = "".join(row([j["id"], j["done"], j["submitted"], j["queued"], j["slots"], round(j["elapsed"], 1)])
                   for j in state["jobs"])
    return HTML(
        f"<b>burla cluster</b> {html.escape(conn.address)}: {len(state['workers'])} workers, "
        f"{sum(w['slots'] for w in state['workers'])} slots, {sum(w['busy'] for w in state['workers'])} busy"
        "<table><tr><th>worker</th><th>host</th><th>slots</th><th>busy</th><th>cpu</th><th>ram GB</th>"
        f"<th>gpu</th><th>containers</th></tr>{workers}</table>"
        + ("<table><tr><th>job</th><th>done</th><th>submitted</th><th>queued</th><th>slots</th><th>elapsed s</th>"
           f"</tr>{jobs}</table>" if jobs else "<p>no running jobs</p>"))
