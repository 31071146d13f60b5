"""IPython magics.

    %%burla x in my_inputs -> results        run the cell once per input, x bound to it; the cell's last
                                              expression is that call's result; the list lands in `results`
    %%burla --cpu 2 --parallelism 8 x in ...  options: --cpu --ram --gpu --parallelism --retries --timeout --cluster
    %%burla -> answer                         run the whole cell once on the cluster
    %burla status                             the cluster: workers, slots, running jobs

Without `-> name` the results are the cell's value (shown as Out). Names the cell uses from the notebook travel
with it like a closure's; names it assigns stay on the worker.
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
USAGE = ("usage: %%burla [--cpu N] [--ram GB] [--gpu SPEC] [--parallelism N] [--retries N] [--timeout S] "
         "[--cluster ADDRESS] [TARGET in ITERABLE] [-> NAME]")


class UsageError(ValueError):
    pass


def parse(line):
    """(options for remote_parallel_map, loop target or None, iterable expression or None, result name or None)."""
    rest, name = line, None
    if "->" in line:
        rest, _, name = line.rpartition("->")
        name = name.strip()
        if not name.isidentifier():
            raise UsageError(f"-> must name a variable, not {name!r}\n{USAGE}")
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
            words = line.split()
            if words[:1] == ["status"]:
                cluster = words[1] if len(words) > 1 else None
                return status_table(cluster)
            raise UsageError("line magic: %burla status [CLUSTER]; cell magic:\n" + USAGE)
        options, target, iterable, name = parse(line)
        function = cell_function(self.shell, cell, target)
        if target is None:
            results = remote_parallel_map(function, [None], **options)[0]
        else:
            inputs = eval(iterable, self.shell.user_ns)
            results = remote_parallel_map(function, inputs, **options)
        if name is None:
            return results
        self.shell.user_ns[name] = results
        return None


def status_table(cluster=None):
    """The cluster's workers and this client's jobs, as an HTML table."""
    from burla.client import cluster_state, connection

    conn = connection(cluster)
    state = cluster_state(conn.address, api_key=conn.api_key)
    def row(values):
        return "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in values) + "</tr>"

    workers = "".join(row([w["id"], w["host"], w["slots"], w["busy"], w["cpu"], round(w["ram"], 1),
                           ", ".join(w["gpu"]) or "-", w.get("containers") or "-"]) for w in state["workers"])
    jobs = "".join(row([j["id"][:8], j["done"], j["submitted"], j["queued"], j["slots"], round(j["elapsed"], 1)])
                   for j in state["jobs"])
    return HTML(
        f"<b>burla cluster</b> {html.escape(conn.address)}: {len(state['workers'])} workers, "
        f"{sum(w['slots'] for w in state['workers'])} slots, {sum(w['busy'] for w in state['workers'])} busy"
        "<table><tr><th>worker</th><th>host</th><th>slots</th><th>busy</th><th>cpu</th><th>ram GB</th>"
        f"<th>gpu</th><th>containers</th></tr>{workers}</table>"
        + ("<table><tr><th>job</th><th>done</th><th>submitted</th><th>queued</th><th>slots</th><th>elapsed s</th>"
           f"</tr>{jobs}</table>" if jobs else "<p>no running jobs</p>"))
