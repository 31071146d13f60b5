import { Widget } from '@lumino/widgets';

import {
  ALL_WORKERS,
  attachCode,
  canAttach,
  copyText,
  duration,
  IJob,
  INotebookLike,
  insertCellBelow,
  Message,
  PanelModel,
  progress,
  total
} from './model';
import { openEvents, requestAPI } from './request';

const DRAW_INTERVAL = 100; // ms: a job streaming thousands of lines a second redraws ten times a second
const NOTICE_TIME = 4000; // ms a notice ("copied", "open a notebook first") stays

/** What the panel needs from JupyterLab's shell: the notebook to insert cells in, and a way to bring it forward. */
export interface IPanelOptions {
  notebook?: () => INotebookLike | null;
  activate?: (notebook: INotebookLike) => void;
}

/** A job's row, kept from one draw to the next and updated in place: a click on one of its buttons is not lost to
 * a redraw that replaced the button between the press and the release (the broker's state comes 4 times a
 * second). */
interface IJobRow {
  node: HTMLElement;
  title: HTMLElement;
  fill: HTMLElement;
  counts: HTMLElement;
  cancel: HTMLButtonElement;
  attach: HTMLButtonElement;
  drawn: string; // what the row shows, to skip an update that changes nothing
}

function el<K extends keyof HTMLElementTagNameMap>(tag: K, className = '', text = ''): HTMLElementTagNameMap[K] {
  const node = document.createElement(tag);
  if (className) {
    node.className = className;
  }
  if (text) {
    node.textContent = text;
  }
  return node;
}

/** The sidebar: the cluster, its workers, running and recent jobs, and the live log of the chosen job. */
export class BurlaPanel extends Widget {
  readonly model = new PanelModel();
  private drawn = -1;
  private timer = 0;
  private closeEvents: () => void;
  private clusterLine = el('div', 'burla-cluster');
  private buttons = el('div', 'burla-buttons');
  private notice = el('div', 'burla-notice');
  private noticeTimer = 0;
  private rows = new Map<string, IJobRow>();
  private workersTable = el('table', 'burla-workers');
  private jobsList = el('div', 'burla-jobs');
  private logTitle = el('div', 'burla-log-title');
  private workerSelect = el('select', 'burla-worker-filter');
  private log = el('pre', 'burla-log');

  constructor(private options: IPanelOptions = {}) {
    super();
    this.id = 'burla-panel';
    this.addClass('burla-panel');
    this.title.caption = 'Burla';
    const section = (name: string) => this.node.appendChild(el('h3', 'burla-section', name));
    this.node.appendChild(el('h2', '', 'Burla'));
    this.node.append(this.clusterLine, this.buttons, this.notice);
    section('Workers');
    this.node.appendChild(this.workersTable);
    section('Jobs');
    this.node.appendChild(this.jobsList);
    section('Logs');
    const bar = el('div', 'burla-log-bar');
    bar.append(this.logTitle, this.workerSelect);
    this.node.append(bar, this.log);
    this.workerSelect.onchange = () => this.model.filter(this.workerSelect.value);
    this.closeEvents = openEvents(
      data => this.model.apply(data as Message),
      open => {
        if (!open) {
          this.model.cluster = { ...this.model.cluster, connected: false };
          this.model.version++;
        }
      }
    );
    this.timer = window.setInterval(() => this.draw(), DRAW_INTERVAL);
  }

  dispose(): void {
    window.clearInterval(this.timer);
    window.clearTimeout(this.noticeTimer);
    this.closeEvents();
    super.dispose();
  }

  private async act(path: string, body: object): Promise<void> {
    try {
      await requestAPI(path, { method: 'POST', body: JSON.stringify(body) });
    } catch (error) {
      this.clusterLine.textContent = `${error}`;
    }
  }

  private async selectJob(id: string): Promise<void> {
    this.model.select(id);
    if (!this.model.hasLines(id)) {
      const history = await requestAPI<{ lines: [string, number, string][] }>(`jobs/${id}/logs`);
      this.model.setHistory(id, history.lines);
    }
  }

  draw(): void {
    if (this.drawn === this.model.version || !this.isVisible) {
      return;
    }
    this.drawn = this.model.version;
    const { cluster } = this.model;
    this.clusterLine.innerHTML = '';
    const dot = el('span', `burla-dot ${cluster.connected ? 'burla-connected' : 'burla-disconnected'}`);
    const where = cluster.address ? `${cluster.embedded ? 'local cluster ' : ''}${cluster.address}` : 'no cluster';
    this.clusterLine.append(dot, ` ${cluster.connected ? 'connected to' : 'not connected:'} ${where}`);
    this.buttons.innerHTML = '';
    if (!cluster.address) {
      const start = el('button', 'jp-mod-styled jp-mod-accept burla-start', 'Start local cluster');
      start.onclick = () => this.act('cluster', { action: 'start' });
      this.buttons.appendChild(start);
    } else if (cluster.embedded) {
      const stop = el('button', 'jp-mod-styled burla-stop', 'Stop local cluster');
      stop.onclick = () => this.act('cluster', { action: 'stop' });
      this.buttons.appendChild(stop);
    }
    this.drawWorkers();
    this.drawJobs();
    this.drawLog();
  }

  private drawWorkers(): void {
    this.workersTable.innerHTML = '<tr><th>worker / host</th><th>slots</th><th>has</th><th>state</th></tr>';
    for (const w of this.model.workers()) {
      const row = el('tr', 'burla-worker');
      row.title = `host ${w.host}${w.containers ? `, runs containers with ${w.containers}` : ''}`;
      const state = w.preparing ? 'preparing env' : w.busy ? 'busy' : 'idle';
      const has = `${w.cpu} cpu, ${w.ram.toFixed(0)} GB` + (w.gpu.length ? `, ${w.gpu.join(', ')}` : '');
      const name = el('td', '', w.id);
      name.appendChild(el('div', 'burla-host', w.host));
      row.appendChild(name);
      for (const cell of [`${w.busy}/${w.slots} busy`, has, state]) {
        row.appendChild(el('td', '', cell));
      }
      this.workersTable.appendChild(row);
    }
  }

  private drawJobs(): void {
    const jobs = this.model.jobs();
    const wanted = new Set(jobs.map(j => j.id));
    for (const [id, row] of this.rows) {
      if (!wanted.has(id)) {
        row.node.remove();
        this.rows.delete(id);
      }
    }
    let empty = this.jobsList.querySelector('.burla-empty');
    if (!jobs.length && !empty) {
      empty = this.jobsList.appendChild(el('div', 'burla-empty', 'no jobs yet'));
    } else if (jobs.length && empty) {
      empty.remove();
    }
    jobs.forEach((job, index) => {
      let row = this.rows.get(job.id);
      if (!row) {
        row = this.jobRow(job.id);
        this.rows.set(job.id, row);
      }
      this.updateRow(row, job);
      if (this.jobsList.children[index] !== row.node) {
        this.jobsList.insertBefore(row.node, this.jobsList.children[index] ?? null); // (only when the order moved)
      }
    });
  }

  private jobRow(id: string): IJobRow {
    const node = el('div', 'burla-job');
    node.dataset.job = id;
    node.onclick = () => void this.selectJob(id);
    const title = el('div', 'burla-job-title');
    const code = el('code', '', id.slice(0, 8));
    code.title = id;
    const text = el('span');
    const cancel = el('button', 'jp-mod-styled jp-mod-warn burla-cancel', 'Cancel');
    cancel.onclick = event => {
      event.stopPropagation();
      void this.act(`jobs/${id}/cancel`, {});
    };
    title.append(code, text, cancel);
    const bar = el('div', 'burla-progress');
    const fill = el('div', 'burla-progress-fill');
    bar.appendChild(fill);
    const counts = el('div', 'burla-counts');
    const actions = el('div', 'burla-job-actions');
    const attach = el('button', 'jp-mod-styled jp-mod-accept burla-attach', 'Attach in a new cell');
    attach.title = 'Insert a cell below the active cell of the notebook that picks this job up (burla.attach)';
    attach.onclick = event => {
      event.stopPropagation();
      this.attachInNotebook(id);
    };
    const copy = el('button', 'jp-mod-styled burla-copy', 'Copy id');
    copy.title = `Copy the job's id (${id}) to the clipboard`;
    copy.onclick = event => {
      event.stopPropagation();
      void copyText(id).then(ok => this.say(ok ? `copied job id ${id}` : `could not copy; the job id is ${id}`));
    };
    actions.append(attach, copy);
    node.append(title, bar, counts, actions);
    return { node, title: text, fill, counts, cancel, attach, drawn: '' };
  }

  private updateRow(row: IJobRow, job: IJob): void {
    const selected = job.id === this.model.selected;
    const counts =
      `${job.done.toLocaleString()} / ${total(job).toLocaleString()} calls · ${job.failed} failed` +
      (job.state === 'running' ? ` · ${job.slots} slots` : '');
    const drawn = JSON.stringify([job.state, selected, job.elapsed, counts, progress(job), !!job.detached, job.reason]);
    if (drawn === row.drawn) {
      return;
    }
    row.drawn = drawn;
    row.node.className = `burla-job burla-job-${job.state}${selected ? ' burla-selected' : ''}` +
      (job.detached ? ' burla-detached' : '');
    row.title.textContent = ` ${job.state} · ${duration(job.elapsed)}${job.detached ? ' · detached' : ''}`;
    row.title.title = job.reason ?? '';
    row.cancel.hidden = job.state !== 'running';
    row.fill.style.width = `${(progress(job) * 100).toFixed(1)}%`;
    row.counts.textContent = counts;
    row.attach.hidden = !canAttach(job);
  }

  /** The "attach in a new cell" button: a cell that picks the job up, below the active cell of the notebook. */
  private attachInNotebook(id: string): void {
    const job = this.model.job(id);
    const notebook = this.options.notebook?.() ?? null;
    if (!job) {
      return;
    }
    if (!notebook) {
      this.say('open a notebook first: the cell that attaches to the job goes below its active cell');
      return;
    }
    try {
      insertCellBelow(notebook, attachCode(job, this.model.cluster));
    } catch (error) {
      this.say(`could not insert the cell: ${error}`);
      return;
    }
    this.options.activate?.(notebook);
    this.say(`a cell attaching to job ${id.slice(0, 8)} is in ${notebook.title.label}: run it`);
  }

  private say(text: string): void {
    this.notice.textContent = text;
    window.clearTimeout(this.noticeTimer);
    this.noticeTimer = window.setTimeout(() => (this.notice.textContent = ''), NOTICE_TIME);
  }

  private drawLog(): void {
    const job = this.model.selected;
    this.logTitle.textContent = job ? `job ${job.slice(0, 8)}` : 'no job selected';
    const options = [ALL_WORKERS, ...this.model.logWorkers()];
    if (this.workerSelect.options.length !== options.length ||
        options.some((w, i) => this.workerSelect.options[i].value !== w)) {
      this.workerSelect.innerHTML = '';
      for (const w of options) {
        const option = el('option', '', w || 'all workers');
        option.value = w;
        this.workerSelect.appendChild(option);
      }
    }
    this.workerSelect.value = this.model.worker;
    const skipped = this.model.skippedLines();
    const lines = this.model.visibleLines();
    const atBottom = this.log.scrollTop + this.log.clientHeight >= this.log.scrollHeight - 4;
    this.log.textContent = (skipped ? `(${skipped.toLocaleString()} lines not shown: too many at once)\n` : '') +
      lines.map(([w, stream, text]) => `${this.model.worker ? '' : `[${w}] `}${stream === 2 ? '! ' : ''}${text}`).join('\n');
    if (atBottom) {
      this.log.scrollTop = this.log.scrollHeight;
    }
  }
}
