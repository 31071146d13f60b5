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
  done: number;
  failed: number;
  submitted: number;
  total?: number | null; // inputs in all, when the client knew
  queued: number;
  slots: number;
  elapsed: number;
  state: string; // running | done | cancelled | failed
  workers?: string[];
}

export interface ICluster {
  address: string | null;
  embedded: boolean;
  connected: boolean;
}

export interface IBrokerState {
  workers: IWorker[];
  jobs: IJob[];
  recent: IJob[];
}

/** [worker, stream (1 stdout, 2 stderr), text] */
export type LogLine = [string, number, string];

export type Message =
  | { type: 'state'; cluster: ICluster; state: IBrokerState | null }
  | { type: 'logs'; job: string; lines: LogLine[]; skipped?: number };

export const MAX_LINES = 2000; // kept per job in the page
export const ALL_WORKERS = '';

export class PanelModel {
  cluster: ICluster = { address: null, embedded: false, connected: false };
  state: IBrokerState | null = null;
  selected: string | null = null; // the job whose log is shown
  worker: string = ALL_WORKERS; // the worker the log is filtered to
  version = 0; // bumped on every change: the view redraws when it moved
  private pinned = false; // the user chose the selected job
  private logs = new Map<string, LogLine[]>();
  private skipped = new Map<string, number>();

  apply(message: Message): void {
    if (message.type === 'state') {
      this.cluster = message.cluster;
      this.state = message.state;
      this.forgetOldLogs();
      if (this.selected === null || !this.job(this.selected)) {
        this.pinned = false; // the job the user chose is gone
      }
      if (!this.pinned) {
        // follow the newest running job; when none runs, stay on the one shown, else the latest that ended
        const running = this.state?.jobs[this.state.jobs.length - 1];
        const stay = this.selected !== null && this.job(this.selected) ? this.selected : null;
        this.selected = running ? running.id : (stay ?? this.state?.recent[0]?.id ?? null);
      }
    } else if (message.type === 'logs') {
      this.addLines(message.job, message.lines);
      if (message.skipped) {
        this.skipped.set(message.job, (this.skipped.get(message.job) ?? 0) + message.skipped);
      }
    }
    this.version++;
  }

  /** Lines fetched from the server for a job the page saw start late. The server keeps every line it streamed,
   * so its tail replaces ours unless ours is already longer. */
  setHistory(job: string, lines: LogLine[]): void {
    if ((this.logs.get(job)?.length ?? 0) >= lines.length) {
      return;
    }
    this.logs.set(job, []);
    this.addLines(job, lines);
    this.version++;
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

  /** Running jobs first (newest first, as the broker lists them), then the recent ones. */
  jobs(): IJob[] {
    return this.state ? [...this.state.jobs, ...this.state.recent] : [];
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

  /** The selected job's lines, filtered to the chosen worker, the last `limit` of them. */
  visibleLines(limit = 1000): LogLine[] {
    if (!this.selected) {
      return [];
    }
    const lines = this.logs.get(this.selected) ?? [];
    const shown = this.worker === ALL_WORKERS ? lines : lines.filter(l => l[0] === this.worker);
    return shown.slice(-limit);
  }

  skippedLines(): number {
    return this.selected ? this.skipped.get(this.selected) ?? 0 : 0;
  }
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
