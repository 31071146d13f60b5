import { Widget } from '@lumino/widgets';

import { ALL_WORKERS, duration, IJob, Message, PanelModel, progress, total } from './model';
import { openEvents, requestAPI } from './request';

const DRAW_INTERVAL = 100; // ms: a job streaming thousands of lines a second redraws ten times a second

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
  private workersTable = el('table', 'burla-workers');
  private jobsList = el('div', 'burla-jobs');
  private logTitle = el('div', 'burla-log-title');
  private workerSelect = el('select', 'burla-worker-filter');
  private log = el('pre', 'burla-log');

  constructor() {
    super();
    this.id = 'burla-panel';
    this.addClass('burla-panel');
    this.title.caption = 'Burla';
    const section = (name: string) => this.node.appendChild(el('h3', 'burla-section', name));
    this.node.appendChild(el('h2', '', 'Burla'));
    this.node.append(this.clusterLine, this.buttons);
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
    this.jobsList.innerHTML = '';
    const jobs = this.model.jobs();
    if (!jobs.length) {
      this.jobsList.appendChild(el('div', 'burla-empty', 'no jobs yet'));
    }
    for (const job of jobs) {
      this.jobsList.appendChild(this.jobRow(job));
    }
  }

  private jobRow(job: IJob): HTMLElement {
    const row = el('div', `burla-job burla-job-${job.state}${job.id === this.model.selected ? ' burla-selected' : ''}`);
    row.dataset.job = job.id;
    row.onclick = () => void this.selectJob(job.id);
    const title = el('div', 'burla-job-title');
    title.append(el('code', '', job.id.slice(0, 8)), ` ${job.state} · ${duration(job.elapsed)}`);
    if (job.state === 'running') {
      const cancel = el('button', 'jp-mod-styled jp-mod-warn burla-cancel', 'Cancel');
      cancel.onclick = event => {
        event.stopPropagation();
        void this.act(`jobs/${job.id}/cancel`, {});
      };
      title.appendChild(cancel);
    }
    const bar = el('div', 'burla-progress');
    const fill = el('div', 'burla-progress-fill');
    fill.style.width = `${(progress(job) * 100).toFixed(1)}%`;
    bar.appendChild(fill);
    const counts = el('div', 'burla-counts',
      `${job.done.toLocaleString()} / ${total(job).toLocaleString()} calls · ${job.failed} failed` +
      (job.state === 'running' ? ` · ${job.slots} slots` : ''));
    row.append(title, bar, counts);
    return row;
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
