/**
 * What the Burla panel knows, built from the messages the server pushes (see burla_jupyter/routes.py):
 * the cluster, the broker's state (workers, running and recent jobs), and the log lines of each job.
 * Plain logic with no JupyterLab in it, so it is unit tested on its own; panel.ts draws it.
 */

export interface IWorker {
  id: string;
  host: string;
  slots: number;
  busy: number;
  cpu: number;
  ram: number;
  gpu: string[];
  containers?: string | null;
  preparing?: number;
}

export interface IJob {
  id: string;
  name?: string | null; // its function, and the notebook cell that started it ("f · cell [3]"), when the client said
  done: number;
  failed: number;
  submitted: number;
  total?: number | null; // inputs in all, when the client knew
  queued: number;
  slots: number;
  elapsed: number;
  state: string; // running | done | cancelled | failed
  workers?: string[];
  started?: number; // seconds since the epoch
  finished?: number | null;
  detached?: number; // 1: it runs with no client, and its outcomes stay on the head (burla.attach picks it up)
  attached?: number; // 1: a client is reading it now
  reason?: string | null; // why it ended, when not done
}

export interface ICluster {
  address: string | null;
  embedded: boolean;
  connected: boolean;
  hint?: string | null; // what kernels do with the server's own cluster, when it has one (or had)
}

export interface IBrokerState {
  workers: IWorker[];
  jobs: IJob[];
  recent: IJob[];
}

/** [worker, stream (1 stdout, 2 stderr), text] */
export type LogLine = [string, number, string];

/** A failed input, as the broker lists it, with the log lines that input printed (the server keeps them). */
export interface IFailure {
  i: number;
  type: string;
  msg: string;
  tb: string;
  lines?: LogLine[];
}

/** [slot "worker/index", t0, t1 (epoch seconds), calls, failed calls, results merged into this bar] */
export type Bar = [string, number, number, number, number, number];

/** What the server keeps of a job for the pictures (burla_jupyter/manager.py, History). points: buckets of `step`
 * seconds, [t, done, failed, slots, busy slots of each of `workers`...]. */
export interface IHistory {
  started: number | null;
  step: number;
  workers: string[];
  points: number[][];
  bars: Bar[];
  missed: number;
  failures: IFailure[];
  ended: boolean;
}

export type Tab = 'logs' | 'charts' | 'failures';

export type Message =
  | { type: 'state'; cluster: ICluster; state: IBrokerState | null; lines?: Record<string, number> }
  | { type: 'logs'; job: string; lines: LogLine[]; skipped?: number; total?: number };

export const MAX_LINES = 2000; // kept per job in the page
export const ALL_WORKERS = '';

export class PanelModel {
  cluster: ICluster = { address: null, embedded: false, connected: false };
  state: IBrokerState | null = null;
  selected: string | null = null; // the job whose log is shown
  worker: string = ALL_WORKERS; // the worker the log is filtered to
  query = ''; // the log's search box: lines that contain it, any case
  tab: Tab = 'logs';
  wanted: string | null = null; // a job chosen before a reload, selected once the first state lists it
  version = 0; // bumped on every change: the view redraws when it moved
  private pinned = false; // the user chose the selected job
  private logs = new Map<string, LogLine[]>();
  private skipped = new Map<string, number>();
  private totals = new Map<string, number>(); // per job: the server's count of its lines that this page has had
  private serverTotals: Record<string, number> = {}; // per job: its lines the server pushed before its last state
  private histories = new Map<string, IHistory>();

  apply(message: Message): void {
    if (message.type === 'state') {
      this.cluster = message.cluster;
      this.state = message.state;
      this.serverTotals = message.lines ?? {};
      this.forgetOldLogs();
      if (this.wanted !== null && this.state) {
        if (this.job(this.wanted)) {
          this.selected = this.wanted;
          this.pinned = true;
        }
        this.wanted = null; // (tried once: a job the cluster forgot is not waited for)
      }
      if (this.selected === null || !this.job(this.selected)) {
        this.pinned = false; // the job the user chose is gone
      }
      if (!this.pinned) {
        // follow the newest running job; when none runs, stay on the one shown, else the latest that ended
        const running = this.state?.jobs[this.state.jobs.length - 1];
        const stay = this.selected !== null && this.job(this.selected) ? this.selected : null;
        const ended = this.jobs().filter(j => j.state !== 'running');
        this.selected = running ? running.id : (stay ?? ended[0]?.id ?? null);
      }
    } else if (message.type === 'logs') {
      let { lines, skipped = 0 } = message;
      const had = this.totals.get(message.job) ?? 0;
      if (message.total !== undefined) {
        // a fetched tail may already hold some of these lines: keep the new ones only
        const fresh = Math.max(0, message.total - had);
        lines = lines.slice(Math.max(0, lines.length - fresh));
        skipped = Math.max(0, fresh - lines.length);
        this.totals.set(message.job, Math.max(had, message.total));
      }
      this.addLines(message.job, lines);
      if (skipped) {
        this.skipped.set(message.job, (this.skipped.get(message.job) ?? 0) + skipped);
      }
    }
    this.version++;
  }

  /** The tail the server kept of a job's lines (for a job the page saw start late, or one whose pushes it
   * missed), and the job's count of lines: it replaces ours unless ours is newer (without a count: longer). The
   * server's tail is every line it had, in order; ours may lack some. */
  setHistory(job: string, lines: LogLine[], total?: number): void {
    const had = this.totals.get(job) ?? 0;
    if (total !== undefined ? total === 0 || total < had : (this.logs.get(job)?.length ?? 0) >= lines.length) {
      return;
    }
    if (total !== undefined) {
      const missed = Math.max(0, total - lines.length - had); // lines neither pushed to us nor in the tail
      this.skipped.set(job, (this.skipped.get(job) ?? 0) + missed);
      this.totals.set(job, total);
    }
    this.logs.set(job, []);
    this.addLines(job, lines);
    this.version++;
  }

  /** Whether the server pushed lines of the job that never reached this page: then its tail is fetched again. */
  behind(job: string): boolean {
    return (this.serverTotals[job] ?? 0) > (this.totals.get(job) ?? 0);
  }

  hasLines(job: string): boolean {
    return (this.logs.get(job)?.length ?? 0) > 0;
  }

  private addLines(job: string, lines: LogLine[]): void {
    let kept = this.logs.get(job);
    if (!kept) {
      kept = [];
      this.logs.set(job, kept);
    }
    kept.push(...lines);
    if (kept.length > MAX_LINES) {
      kept.splice(0, kept.length - MAX_LINES);
    }
  }

  private forgetOldLogs(): void {
    const known = new Set(this.jobs().map(j => j.id));
    for (const id of Array.from(this.logs.keys())) {
      if (!known.has(id)) {
        this.logs.delete(id);
        this.skipped.delete(id);
        this.totals.delete(id);
      }
    }
    for (const id of Array.from(this.histories.keys())) {
      if (!known.has(id)) {
        this.histories.delete(id);
      }
    }
  }

  /** The user's choice: kept until that job is forgotten (otherwise the newest running job is shown). */
  select(job: string | null): void {
    this.selected = job;
    this.pinned = job !== null;
    this.worker = ALL_WORKERS;
    this.version++;
  }

  filter(worker: string): void {
    this.worker = worker;
    this.version++;
  }

  search(query: string): void {
    this.query = query;
    this.version++;
  }

  show(tab: Tab): void {
    this.tab = tab;
    this.version++;
  }

  setJobHistory(job: string, history: IHistory): void {
    this.histories.set(job, history);
    this.version++;
  }

  history(job: string | null): IHistory | undefined {
    return job ? this.histories.get(job) : undefined;
  }

  /** Running jobs first (as the broker lists them), then the ended ones, the latest to end first. The broker lists
   * its ended attached jobs, then its ended detached ones: they are merged here, and a job listed twice is shown
   * once (as running, if it is). */
  jobs(): IJob[] {
    if (!this.state) {
      return [];
    }
    const seen = new Set(this.state.jobs.map(j => j.id));
    const ended: IJob[] = [];
    for (const job of this.state.recent) {
      if (!seen.has(job.id)) {
        seen.add(job.id);
        ended.push(job);
      }
    }
    ended.sort((a, b) => endedAt(b) - endedAt(a)); // (a stable sort: ties keep the broker's order)
    return [...this.state.jobs, ...ended];
  }

  job(id: string): IJob | undefined {
    return this.jobs().find(j => j.id === id);
  }

  workers(): IWorker[] {
    return this.state ? this.state.workers : [];
  }

  /** The workers that printed something in the selected job, for the filter. */
  logWorkers(): string[] {
    const lines = this.selected ? this.logs.get(this.selected) ?? [] : [];
    return Array.from(new Set(lines.map(l => l[0]))).sort();
  }

  /** The selected job's lines, filtered to the chosen worker and the search, the last `limit` of them. */
  visibleLines(limit = 1000): LogLine[] {
    return this.matchingLines().slice(-limit);
  }

  /** The selected job's lines the filters let through, and how many it has in all. */
  matchingLines(): LogLine[] {
    const lines = this.selected ? this.logs.get(this.selected) ?? [] : [];
    const query = this.query.trim().toLowerCase();
    if (this.worker === ALL_WORKERS && !query) {
      return lines;
    }
    return lines.filter(l => (this.worker === ALL_WORKERS || l[0] === this.worker) &&
                             (!query || l[2].toLowerCase().includes(query)));
  }

  lineCount(): number {
    return this.selected ? this.logs.get(this.selected)?.length ?? 0 : 0;
  }

  skippedLines(): number {
    return this.selected ? this.skipped.get(this.selected) ?? 0 : 0;
  }
}

/** When a job ended, in seconds since the epoch (0 if the broker did not say). */
function endedAt(job: IJob): number {
  return job.finished ?? (job.started !== undefined ? job.started + job.elapsed : 0);
}

/** Whether a kernel can pick the job up with burla.attach: a detached job's outcomes stay on the head, so it can,
 * running or ended; an attached job's went to its client. */
export function canAttach(job: IJob): boolean {
  return !!job.detached;
}

/** The code of the cell that attaches to a job: it works in a fresh kernel (no extension to load), shows the job's
 * live view in the cell and keeps its results. The cluster is named where the panel knows it, for a kernel that
 * does not have it configured (one started before the panel started its local cluster). */
export function attachCode(job: IJob, cluster: ICluster): string {
  const where = cluster.address ? `, cluster=${JSON.stringify(cluster.address)}` : '';
  return (
    "import burla\n\n# the job's live view, then its results in input order\n" +
    `results = burla.attach(${JSON.stringify(job.id)}${where}).result()\n`
  );
}

/** What the panel uses of a JupyterLab notebook panel (@jupyterlab/notebook's NotebookPanel, which this extension
 * does not depend on): its notebook widget, the active cell and the shared model cells are inserted into. */
export interface INotebookLike {
  id: string;
  title: { label: string };
  content: {
    activeCellIndex: number;
    activeCell: unknown;
    model: { sharedModel: { insertCell(index: number, cell: object): unknown } } | null;
    deselectAll?: () => void;
    scrollToItem?: (index: number, align?: string) => unknown;
  };
}

export function isNotebook(widget: unknown): widget is INotebookLike {
  const content = (widget as { content?: INotebookLike['content'] } | null)?.content;
  return (
    !!content &&
    typeof content.activeCellIndex === 'number' &&
    typeof content.model?.sharedModel?.insertCell === 'function'
  );
}

/** Insert a code cell below the notebook's active cell and make it the active one (as JupyterLab's "insert a cell
 * below" does); its index. */
export function insertCellBelow(notebook: INotebookLike, source: string): number {
  const { content } = notebook;
  if (!content.model) {
    throw new Error('the notebook is not loaded yet');
  }
  const index = content.activeCell ? content.activeCellIndex + 1 : 0;
  content.model.sharedModel.insertCell(index, { cell_type: 'code', source, metadata: { trusted: true } });
  content.activeCellIndex = index;
  content.deselectAll?.();
  void content.scrollToItem?.(index, 'smart');
  return index;
}

/** Put text on the clipboard: the Clipboard API where the page may use it, else a selected textarea and the
 * older copy command (pages not served over HTTPS or localhost, older browsers). Whether it worked. */
export async function copyText(
  text: string,
  nav: { clipboard?: { writeText(text: string): Promise<void> } } | undefined = globalThis.navigator,
  doc: Document | undefined = globalThis.document
): Promise<boolean> {
  if (nav?.clipboard?.writeText) {
    try {
      await nav.clipboard.writeText(text);
      return true;
    } catch {
      // (refused: not a secure context, no permission, the page not focused) the fallback below
    }
  }
  if (!doc?.body) {
    return false;
  }
  const area = doc.createElement('textarea');
  area.value = text;
  area.setAttribute('readonly', '');
  area.style.position = 'fixed';
  area.style.opacity = '0';
  doc.body.appendChild(area);
  try {
    area.select();
    return doc.execCommand('copy');
  } catch {
    return false;
  } finally {
    doc.body.removeChild(area);
  }
}

/** What a job is called: its function (and cell) when the client said, else its id. */
export function jobName(job: IJob): string {
  return job.name || job.id.slice(0, 8);
}

/** An exception's type as Python shows it: a builtin one without its module. */
export function exceptionName(type: string): string {
  return type.startsWith('builtins.') ? type.slice('builtins.'.length) : type;
}

/** Inputs in all if the client said, else those submitted so far. */
export function total(job: IJob): number {
  return job.total ?? job.submitted;
}

/** Fraction of a job's inputs that have an outcome. */
export function progress(job: IJob): number {
  const n = total(job);
  if (!n) {
    return job.state === 'running' ? 0 : 1;
  }
  return Math.min(job.done / n, 1);
}

export function duration(seconds: number): string {
  if (seconds < 60) {
    return `${seconds.toFixed(1)} s`;
  }
  const minutes = Math.floor(seconds / 60);
  if (minutes < 60) {
    return `${minutes} min ${Math.floor(seconds % 60)} s`;
  }
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}
