import { Widget } from '@lumino/widgets';

import { busyChart, legend, progressChart, timelineChart } from './charts';
import {
  ALL_WORKERS,
  attachCode,
  canAttach,
  copyText,
  duration,
  exceptionName,
  IFailure,
  IHistory,
  IJob,
  INotebookLike,
  insertCellBelow,
  jobName,
  LogLine,
  Message,
  PanelModel,
  progress,
  Tab,
  total
} from './model';
import { openEvents, requestAPI } from './request';

const DRAW_INTERVAL = 100; // ms: a job streaming thousands of lines a second redraws ten times a second
const HISTORY_INTERVAL = 1000; // ms between fetches of the shown job's history, while it runs
const NOTICE_TIME = 4000; // ms a notice ("copied", "open a notebook first") stays
const SELECTED_KEY = 'burla:selected-job'; // localStorage: the job chosen, restored after a reload
const TAB_KEY = 'burla:tab';
const TABS: [Tab, string][] = [['logs', 'Logs'], ['charts', 'Charts'], ['failures', 'Failures']];

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
  name: HTMLElement;
  id: HTMLElement;
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

function stored(key: string): string | null {
  try {
    return window.localStorage.getItem(key);
  } catch {
    return null; // (storage refused: private windows, sandboxed pages)
  }
}

function store(key: string, value: string | null): void {
  try {
    if (value === null) {
      window.localStorage.removeItem(key);
    } else {
      window.localStorage.setItem(key, value);
    }
  } catch {
    // not kept: the panel works the same, it only forgets across reloads
  }
}

function plural(n: number, word: string): string {
  return `${n.toLocaleString()} ${word}${n === 1 ? '' : 's'}`;
}

function logText(lines: LogLine[], withWorker: boolean): string {
  const line = ([w, stream, text]: LogLine) => `${withWorker ? `[${w}] ` : ''}${stream === 2 ? '! ' : ''}${text}`;
  return lines.map(line).join('\n');
}

/** The sidebar: the cluster, its workers, running and recent jobs, and the chosen job's logs, charts and
 * failures. */
export class BurlaPanel extends Widget {
  readonly model = new PanelModel();
  private drawn = -1;
  private timer = 0;
  private historyTimer = 0;
  private closeEvents: () => void;
  private clusterLine = el('div', 'burla-cluster');
  private hint = el('div', 'burla-hint');
  private buttons = el('div', 'burla-buttons');
  private notice = el('div', 'burla-notice');
  private noticeTimer = 0;
  private rows = new Map<string, IJobRow>();
  private workersTable = el('table', 'burla-workers');
  private workersDrawn = '';
  private jobsList = el('div', 'burla-jobs');
  private detailTitle = el('div', 'burla-detail-title');
  private tabButtons = new Map<Tab, HTMLButtonElement>();
  private pages = new Map<Tab, HTMLElement>();
  private logTitle = el('span', 'burla-log-title');
  private search = el('input', 'burla-log-search');
  private workerSelect = el('select', 'burla-worker-filter');
  private log = el('pre', 'burla-log');
  private charts = el('div', 'burla-charts');
  private failures = el('div', 'burla-failures');
  private fetchedLogs = new Set<string>(); // jobs whose kept tail this page asked the server for
  private fetchingLogs = new Set<string>(); // those asked for now
  private fetching = new Set<string>(); // history requests in flight
  private fetchedEnded = new Map<string, number>(); // job -> history fetches made after it ended
  private chartsDrawn: [IHistory | undefined, number] = [undefined, 0];
  private failuresDrawn: IHistory | undefined | null = null;
  private openTracebacks = new Set<string>(); // "job:input" of the tracebacks the user opened

  constructor(private options: IPanelOptions = {}) {
    super();
    this.id = 'burla-panel';
    this.addClass('burla-panel');
    this.title.caption = 'Burla';
    const section = (name: string) => this.node.appendChild(el('h3', 'burla-section', name));
    this.node.appendChild(el('h2', '', 'Burla'));
    this.node.append(this.clusterLine, this.hint, this.buttons, this.notice);
    section('Workers');
    const workers = this.node.appendChild(el('div', 'burla-workers-box'));
    workers.appendChild(this.workersTable);
    section('Jobs');
    this.node.appendChild(this.jobsList);
    const detail = this.node.appendChild(el('div', 'burla-detail'));
    const tabs = el('div', 'burla-tabs');
    for (const [tab, label] of TABS) {
      const button = el('button', `burla-tab burla-tab-${tab}`, label);
      button.onclick = () => {
        this.model.show(tab);
        store(TAB_KEY, tab);
        void this.refreshHistory(true);
      };
      this.tabButtons.set(tab, button);
      tabs.appendChild(button);
      this.pages.set(tab, el('div', `burla-page burla-page-${tab}`));
    }
    detail.append(this.detailTitle, tabs, ...this.pages.values());
    const bar = el('div', 'burla-log-bar');
    this.search.type = 'search';
    this.search.placeholder = 'filter lines';
    this.search.oninput = () => this.model.search(this.search.value);
    bar.append(this.search, this.workerSelect, this.logTitle);
    this.pages.get('logs')!.append(bar, this.log);
    this.pages.get('charts')!.appendChild(this.charts);
    this.pages.get('failures')!.appendChild(this.failures);
    this.workerSelect.onchange = () => this.model.filter(this.workerSelect.value);

    this.model.wanted = stored(SELECTED_KEY);
    const tab = stored(TAB_KEY);
    if (TABS.some(([t]) => t === tab)) {
      this.model.tab = tab as Tab;
    }
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
    this.historyTimer = window.setInterval(() => void this.refreshHistory(false), HISTORY_INTERVAL);
  }

  dispose(): void {
    window.clearInterval(this.timer);
    window.clearInterval(this.historyTimer);
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

  private selectJob(id: string): void {
    this.model.select(id);
    store(SELECTED_KEY, id);
    void this.refreshHistory(true);
  }

  /** The tail the server kept of the shown job: once per job (lines that came before this page did, or before a
   * reload), and again when the server counts lines of it that never reached this page (pushes lost while the
   * page reconnected, say: without this its log would end early for good). */
  private async fetchLogs(id: string): Promise<void> {
    this.fetchedLogs.add(id);
    this.fetchingLogs.add(id);
    try {
      const history = await requestAPI<{ lines: LogLine[]; total?: number }>(`jobs/${id}/logs`);
      this.model.setHistory(id, history.lines, history.total);
    } catch {
      this.fetchedLogs.delete(id); // tried again on the next draw
    } finally {
      this.fetchingLogs.delete(id);
    }
  }

  /** The shown job's history, for the charts and failures tabs: again while it runs, once more when it ended. */
  private async refreshHistory(now: boolean): Promise<void> {
    const id = this.model.selected;
    if (!id || this.model.tab === 'logs' || this.fetching.has(id) || !this.isVisible) {
      return;
    }
    const known = this.model.history(id);
    const ended = this.model.job(id)?.state !== 'running';
    const after = this.fetchedEnded.get(id) ?? 0; // fetches since it ended (the server may take a push to see it)
    if (!now && known && (known.ended || (ended && after >= 2))) {
      return; // we have its last history
    }
    if (ended) {
      this.fetchedEnded.set(id, after + 1);
    }
    this.fetching.add(id);
    try {
      this.model.setJobHistory(id, await requestAPI<IHistory>(`jobs/${id}/history`));
    } catch {
      // the next tick tries again
    } finally {
      this.fetching.delete(id);
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
    this.hint.textContent = cluster.hint ?? '';
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
    const selected = this.model.selected;
    if (selected && this.model.job(selected) && !this.fetchingLogs.has(selected) &&
        (!this.fetchedLogs.has(selected) || this.model.behind(selected))) {
      void this.fetchLogs(selected);
    }
    this.drawWorkers();
    this.drawJobs();
    this.drawDetail();
  }

  private drawWorkers(): void {
    // one line per worker (a dot for its state; the host and everything else in the row's tooltip)
    const drawn = JSON.stringify(this.model.workers());
    if (drawn === this.workersDrawn) {
      return; // (a tooltip being read stays)
    }
    this.workersDrawn = drawn;
    this.workersTable.innerHTML =
      '<colgroup><col class="burla-col-name"><col class="burla-col-busy"><col class="burla-col-has"></colgroup>' +
      '<tr><th>worker</th><th>busy</th><th>has</th></tr>';
    for (const w of this.model.workers()) {
      const row = el('tr', 'burla-worker');
      const state = w.preparing ? 'preparing env' : w.busy ? 'busy' : 'idle';
      const has = `${w.cpu} cpu · ${w.ram.toFixed(0)} GB` + (w.gpu.length ? ` · ${w.gpu.join(', ')}` : '');
      row.title = `${w.id} on host ${w.host}: ${state}, ${w.busy} of ${w.slots} slots busy; ${has}` +
        (w.containers ? `; runs containers with ${w.containers}` : '');
      const name = el('td');
      name.append(el('span', `burla-dot burla-state-${state.split(' ')[0]}`), ` ${w.id}`);
      if (w.host && w.host !== w.id) {
        name.appendChild(el('span', 'burla-host', ` ${w.host}`));
      }
      row.append(name, el('td', '', `${w.busy}/${w.slots}${w.preparing ? ' prep' : ''}`), el('td', '', has));
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
    // three short lines: its name (the id beside it), progress, then state and counts with the buttons
    const node = el('div', 'burla-job');
    node.dataset.job = id;
    node.onclick = () => this.selectJob(id);
    const head = el('div', 'burla-job-title');
    const name = el('span', 'burla-job-name');
    const code = el('code', 'burla-job-id', id.slice(0, 8));
    code.title = id;
    const cancel = el('button', 'jp-mod-styled jp-mod-warn burla-cancel', 'Cancel');
    cancel.onclick = event => {
      event.stopPropagation();
      void this.act(`jobs/${id}/cancel`, {});
    };
    head.append(name, code, cancel);
    const bar = el('div', 'burla-progress');
    const fill = el('div', 'burla-progress-fill');
    bar.appendChild(fill);
    const foot = el('div', 'burla-job-foot');
    const text = el('span', 'burla-job-state');
    const counts = el('span', 'burla-counts');
    counts.title = "outcomes the cluster has, failed ones included (a notebook's view counts those its kernel read)";
    const attach = el('button', 'jp-mod-styled jp-mod-accept burla-attach', 'Attach');
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
    const texts = el('span', 'burla-job-texts');
    texts.append(text, counts);
    foot.append(texts, attach, copy);
    node.append(head, bar, foot);
    return { node, name, id: code, title: text, fill, counts, cancel, attach, drawn: '' };
  }

  private updateRow(row: IJobRow, job: IJob): void {
    const selected = job.id === this.model.selected;
    const counts =
      `${job.done.toLocaleString()} / ${total(job).toLocaleString()} calls · ${job.failed.toLocaleString()} failed` +
      (job.state === 'running' ? ` · ${job.slots} slots` : '');
    const drawn = JSON.stringify([job.state, selected, job.elapsed, counts, progress(job), !!job.detached, job.reason,
                                  job.name]);
    if (drawn === row.drawn) {
      return;
    }
    row.drawn = drawn;
    row.node.className = `burla-job burla-job-${job.state}${selected ? ' burla-selected' : ''}` +
      (job.detached ? ' burla-detached' : '');
    row.name.textContent = jobName(job);
    row.name.title = job.name ?? job.id;
    row.id.hidden = !job.name; // (without a name, the id is the name)
    row.title.textContent = `${job.state} · ${duration(job.elapsed)}${job.detached ? ' · detached' : ''} · `;
    row.title.title = job.reason ?? '';
    row.cancel.hidden = job.state !== 'running';
    row.fill.style.width = `${(progress(job) * 100).toFixed(1)}%`;
    row.counts.textContent = counts;
    row.attach.hidden = !canAttach(job);
  }

  /** The "attach" button: a cell that picks the job up, below the active cell of the notebook. */
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

  private drawDetail(): void {
    const id = this.model.selected;
    const job = id ? this.model.job(id) : undefined;
    this.detailTitle.textContent = job ? `${jobName(job)}${job.name ? ` · ${job.id.slice(0, 8)}` : ''}` :
      'no job selected';
    this.detailTitle.title = job?.id ?? '';
    for (const [tab, button] of this.tabButtons) {
      button.classList.toggle('burla-tab-active', tab === this.model.tab);
      this.pages.get(tab)!.hidden = tab !== this.model.tab;
    }
    this.tabButtons.get('failures')!.textContent = job?.failed ? `Failures (${job.failed.toLocaleString()})` :
      'Failures';
    this.drawLog();
    if (this.model.tab === 'charts') {
      this.drawCharts();
    } else if (this.model.tab === 'failures') {
      this.drawFailures();
    }
  }

  private drawCharts(): void {
    const id = this.model.selected;
    const history = this.model.history(id);
    const width = Math.max(this.charts.clientWidth, 120);
    if (this.chartsDrawn[0] === history && this.chartsDrawn[1] === width) {
      return; // (redrawn when a fetch brings a new history, or the sidebar is resized)
    }
    this.chartsDrawn = [history, width];
    if (!id || !history) {
      this.charts.innerHTML = `<div class="burla-empty">${id ? 'loading…' : 'no job selected'}</div>`;
      return;
    }
    const job = this.model.job(id);
    const drawn = history.bars.reduce((n, b) => n + b[3], 0);
    const missed = job && history.bars.length && job.done > drawn // (results between two updates, or before)
      ? `<div class="burla-note">${plural(job.done - drawn, 'call')} not on the timeline</div>` : '';
    this.charts.innerHTML =
      '<div class="burla-chart-title">throughput and progress</div>' + progressChart(history, job, width) +
      '<div class="burla-chart-title">busy slots per worker</div>' + busyChart(history, width) +
      `<div class="burla-legend">${legend(history.workers)}</div>` +
      '<div class="burla-chart-title">task timeline (a bar per result, per slot)</div>' +
      timelineChart(history, width) + missed;
  }

  private drawFailures(): void {
    const id = this.model.selected;
    const history = this.model.history(id);
    if (this.failuresDrawn === history) {
      return;
    }
    this.failuresDrawn = history;
    this.failures.innerHTML = '';
    const job = id ? this.model.job(id) : undefined;
    if (!id || !history) {
      this.failures.appendChild(el('div', 'burla-empty', id ? 'loading…' : 'no job selected'));
      return;
    }
    if (!history.failures.length) {
      const why = job?.failed ? `${job.failed.toLocaleString()} calls failed; the cluster sent no details of them`
        : 'no failed calls';
      this.failures.appendChild(el('div', 'burla-empty', why));
      return;
    }
    if (job && job.failed > history.failures.length) {
      this.failures.appendChild(el('div', 'burla-note',
        `the first ${history.failures.length} of ${job.failed.toLocaleString()} failed calls`));
    }
    for (const f of history.failures) {
      this.failures.appendChild(this.failureItem(id, f));
    }
  }

  private failureItem(job: string, f: IFailure): HTMLElement {
    const item = el('div', 'burla-failure');
    item.dataset.input = `${f.i}`;
    const head = el('div', 'burla-failure-head');
    head.append(el('b', '', `input ${f.i}`), ` ${exceptionName(f.type)}: ${f.msg}`);
    item.appendChild(head);
    const key = `${job}:${f.i}`;
    const tb = el('details', 'burla-traceback');
    tb.open = this.openTracebacks.has(key);
    tb.ontoggle = () => (tb.open ? this.openTracebacks.add(key) : this.openTracebacks.delete(key));
    tb.append(el('summary', '', 'traceback'), el('pre', '', f.tb || '(none sent)'));
    item.appendChild(tb);
    const lines = f.lines ?? [];
    item.appendChild(el('div', 'burla-failure-lines-title',
                        lines.length ? `its output (${plural(lines.length, 'line')})` : 'it printed nothing'));
    if (lines.length) {
      item.appendChild(el('pre', 'burla-failure-lines', logText(lines, true)));
    }
    return item;
  }

  private drawLog(): void {
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
    if (this.search.value !== this.model.query) {
      this.search.value = this.model.query;
    }
    if (this.model.tab !== 'logs') {
      return;
    }
    const skipped = this.model.skippedLines();
    const matching = this.model.matchingLines();
    const filtered = this.model.query.trim() || this.model.worker !== ALL_WORKERS;
    this.logTitle.textContent = filtered ?
      `${matching.length.toLocaleString()} of ${this.model.lineCount().toLocaleString()} lines` : '';
    const lines = matching.slice(-1000);
    const atBottom = this.log.scrollTop + this.log.clientHeight >= this.log.scrollHeight - 4;
    this.log.textContent = (skipped ? `(${skipped.toLocaleString()} lines not shown: too many at once)\n` : '') +
      logText(lines, !this.model.worker);
    if (atBottom) {
      this.log.scrollTop = this.log.scrollHeight;
    }
  }
}
