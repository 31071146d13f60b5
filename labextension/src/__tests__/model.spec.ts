import {
  ALL_WORKERS,
  attachCode,
  canAttach,
  copyText,
  duration,
  exceptionName,
  IJob,
  insertCellBelow,
  isNotebook,
  jobName,
  LogLine,
  MAX_LINES,
  PanelModel,
  progress,
  total
} from '../model';

function job(id: string, extra: Partial<IJob> = {}): IJob {
  return { id, done: 0, failed: 0, submitted: 10, queued: 0, slots: 2, elapsed: 1, state: 'running', ...extra };
}

function state(jobs: IJob[], recent: IJob[] = []) {
  return {
    type: 'state' as const,
    cluster: { address: 'ipc:///tmp/x/broker', embedded: false, connected: true },
    state: { workers: [], jobs, recent }
  };
}

describe('PanelModel', () => {
  it('selects the newest running job (the broker lists the oldest first), then keeps the choice', () => {
    const m = new PanelModel();
    m.apply(state([job('a'), job('b')]));
    expect(m.selected).toBe('b');
    m.select('a');
    m.apply(state([job('a'), job('b')]));
    expect(m.selected).toBe('a');
  });

  it('follows a new running job unless the user chose one', () => {
    const m = new PanelModel();
    m.apply(state([], [job('old', { state: 'done' })]));
    expect(m.selected).toBe('old');
    m.apply(state([job('new')], [job('old', { state: 'done' })]));
    expect(m.selected).toBe('new');
    m.select('old');
    m.apply(state([job('new'), job('newer')], [job('old', { state: 'done' })]));
    expect(m.selected).toBe('old');
  });

  it('falls back to the most recent job when the selected one is forgotten', () => {
    const m = new PanelModel();
    m.apply(state([job('a')]));
    m.apply(state([], [job('b', { state: 'done' })]));
    expect(m.selected).toBe('b');
    expect(m.jobs().map(j => j.id)).toEqual(['b']);
  });

  it('keeps log lines per job, filters by worker and caps them', () => {
    const m = new PanelModel();
    m.apply(state([job('a')]));
    const lines: LogLine[] = [];
    for (let i = 0; i < MAX_LINES + 50; i++) {
      lines.push([i % 2 ? 'w1' : 'w2', 1, `line ${i}`]);
    }
    m.apply({ type: 'logs', job: 'a', lines });
    expect(m.visibleLines(MAX_LINES * 2)).toHaveLength(MAX_LINES);
    expect(m.visibleLines(1)[0][2]).toBe(`line ${MAX_LINES + 49}`);
    expect(m.logWorkers()).toEqual(['w1', 'w2']);
    m.filter('w1');
    expect(m.visibleLines(5).every(l => l[0] === 'w1')).toBe(true);
    m.select('a');
    expect(m.worker).toBe(ALL_WORKERS);
  });

  it('forgets the logs of jobs the broker no longer lists', () => {
    const m = new PanelModel();
    m.apply(state([job('a')]));
    m.apply({ type: 'logs', job: 'a', lines: [['w1', 1, 'hi']] });
    expect(m.hasLines('a')).toBe(true);
    m.apply(state([job('b')]));
    expect(m.hasLines('a')).toBe(false);
  });

  it('counts lines the server skipped, and takes a longer history', () => {
    const m = new PanelModel();
    m.apply(state([job('a')]));
    m.apply({ type: 'logs', job: 'a', lines: [['w1', 1, 'late']], skipped: 7 });
    expect(m.skippedLines()).toBe(7);
    m.setHistory('a', [['w1', 1, 'early'], ['w1', 1, 'late']]);
    expect(m.visibleLines().map(l => l[2])).toEqual(['early', 'late']);
    m.setHistory('a', [['w1', 1, 'stale']]);
    expect(m.visibleLines()).toHaveLength(2);
  });

  it('knows when pushes of a job were lost, and heals from the server tail', () => {
    const m = new PanelModel();
    const lines = (from: number, to: number): LogLine[] =>
      Array.from({ length: to - from }, (_, k) => ['w1', 1, `${from + k}`] as LogLine);
    m.apply({ ...state([job('a')]), lines: {} });
    m.apply({ type: 'logs', job: 'a', lines: lines(0, 3), skipped: 0, total: 3 });
    m.apply({ ...state([job('a')]), lines: { a: 3 } });
    expect(m.behind('a')).toBe(false);
    // pushes of lines 3..9 never came (a reconnect); the next state counts them
    m.apply({ ...state([job('a')]), lines: { a: 10 } });
    expect(m.behind('a')).toBe(true);
    // a tail of the last 5 of 12 lines: lines 3 to 6 are counted as not shown, the tail replaces ours
    m.setHistory('a', lines(7, 12), 12);
    expect(m.behind('a')).toBe(false);
    expect(m.visibleLines().map(l => l[2])).toEqual(['7', '8', '9', '10', '11']);
    expect(m.skippedLines()).toBe(4);
    // a push the tail already held (it was on its way when the tail was fetched) adds only its new line
    m.apply({ type: 'logs', job: 'a', lines: lines(10, 13), skipped: 0, total: 13 });
    expect(m.visibleLines().map(l => l[2])).toEqual(['7', '8', '9', '10', '11', '12']);
    // an older tail than what the page has changes nothing
    m.setHistory('a', lines(8, 11), 11);
    expect(m.visibleLines()).toHaveLength(6);
  });

  it('moves its version on every change', () => {
    const m = new PanelModel();
    const before = m.version;
    m.apply(state([]));
    m.filter('w1');
    expect(m.version).toBe(before + 2);
  });
});

describe('helpers', () => {
  it('computes progress', () => {
    expect(progress(job('a', { done: 5 }))).toBe(0.5);
    expect(progress(job('a', { submitted: 0 }))).toBe(0);
    expect(progress(job('a', { submitted: 0, state: 'done' }))).toBe(1);
    expect(progress(job('a', { done: 12 }))).toBe(1);
    expect(progress(job('a', { done: 5, total: 100 }))).toBe(0.05);
    expect(total(job('a', { total: null }))).toBe(10);
  });

  it('formats durations', () => {
    expect(duration(3.21)).toBe('3.2 s');
    expect(duration(125)).toBe('2 min 5 s');
    expect(duration(7300)).toBe('2 h 1 min');
  });
});

describe('ended and detached jobs', () => {
  it('lists the running jobs, then the ended ones latest first, each once', () => {
    const m = new PanelModel();
    // the broker sends its ended attached jobs, then its ended detached ones
    m.apply(state([job('run', { detached: 1 })], [
      job('attached-old', { state: 'done', finished: 100 }),
      job('detached-new', { state: 'done', finished: 300, detached: 1 }),
      job('detached-mid', { state: 'failed', finished: 200, detached: 1 }),
      job('run', { state: 'done', finished: 400 })
    ]));
    expect(m.jobs().map(j => j.id)).toEqual(['run', 'detached-new', 'detached-mid', 'attached-old']);
    expect(m.job('run')?.state).toBe('running');
    expect(m.selected).toBe('run');
    m.apply(state([], [
      job('attached-old', { state: 'done', finished: 100 }),
      job('detached-new', { state: 'done', finished: 300, detached: 1 })
    ]));
    expect(m.selected).toBe('detached-new'); // the latest to end
  });

  it('falls back to started + elapsed for when a job ended', () => {
    const m = new PanelModel();
    m.apply(state([], [job('a', { state: 'done', started: 10, elapsed: 5 }),
                       job('b', { state: 'done', started: 12, elapsed: 5 })]));
    expect(m.jobs().map(j => j.id)).toEqual(['b', 'a']);
  });

  it('offers to attach to detached jobs only, with code that works in a fresh kernel', () => {
    expect(canAttach(job('a', { detached: 1, state: 'done' }))).toBe(true);
    expect(canAttach(job('a', { detached: 1 }))).toBe(true);
    expect(canAttach(job('a', { detached: 0, state: 'done' }))).toBe(false);
    expect(canAttach(job('a'))).toBe(false);
    const id = '0123456789abcdef';
    const code = attachCode(job(id), { address: 'ipc:///tmp/a "b"/broker', embedded: false, connected: true });
    expect(code).toBe("import burla\n\n# the job's live view, then its results in input order\n" +
                      'results = burla.attach("0123456789abcdef", cluster="ipc:///tmp/a \\"b\\"/broker").result()\n');
    expect(attachCode(job(id), { address: null, embedded: false, connected: false }))
      .toContain('burla.attach("0123456789abcdef").result()');
  });
});

function fakeNotebook(cells: string[], active: number | null) {
  const inserted: object[] = [];
  const nb = {
    id: 'nb', title: { label: 'job.ipynb' }, deselected: 0,
    content: {
      activeCellIndex: active ?? 0,
      activeCell: active === null ? null : {},
      model: { sharedModel: { insertCell: (index: number, cell: { source: string }) => {
        cells.splice(index, 0, cell.source);
        inserted.push(cell);
      } } },
      deselectAll: () => nb.deselected++
    }
  };
  return { nb, inserted };
}

describe('inserting a cell', () => {
  it('goes below the active cell and becomes the active one', () => {
    const cells = ['a', 'b', 'c'];
    const { nb, inserted } = fakeNotebook(cells, 1);
    expect(isNotebook(nb)).toBe(true);
    expect(insertCellBelow(nb, 'new')).toBe(2);
    expect(cells).toEqual(['a', 'b', 'new', 'c']);
    expect(nb.content.activeCellIndex).toBe(2);
    expect(nb.deselected).toBe(1);
    expect(inserted[0]).toEqual({ cell_type: 'code', source: 'new', metadata: { trusted: true } });
  });

  it('goes first when no cell is active, and not at all in a notebook not loaded', () => {
    const cells = ['a'];
    const { nb } = fakeNotebook(cells, null);
    insertCellBelow(nb, 'new');
    expect(cells).toEqual(['new', 'a']);
    const unloaded = { ...nb, content: { ...nb.content, model: null } };
    expect(isNotebook(unloaded)).toBe(false);
    expect(() => insertCellBelow(unloaded, 'x')).toThrow('not loaded');
    expect(isNotebook(null)).toBe(false);
    expect(isNotebook({ content: { activeCellIndex: 0 } })).toBe(false); // (a text editor has no cells)
  });
});

function fakeDocument(copies: boolean) {
  const body = { children: [] as object[], appendChild(n: object) { this.children.push(n); },
                 removeChild(n: object) { this.children.splice(this.children.indexOf(n), 1); } };
  const doc = {
    body, copied: [] as string[],
    createElement: () => {
      const area = { value: '', style: {}, setAttribute: () => undefined, select: () => (doc.selected = area.value) };
      return area;
    },
    selected: '',
    execCommand: (command: string) => {
      if (command !== 'copy' || !copies) {
        return false;
      }
      doc.copied.push(doc.selected);
      return true;
    }
  };
  return doc;
}

describe('copying a job id', () => {
  it('uses the Clipboard API', async () => {
    const written: string[] = [];
    const nav = { clipboard: { writeText: async (t: string) => void written.push(t) } };
    expect(await copyText('abc', nav, fakeDocument(true) as unknown as Document)).toBe(true);
    expect(written).toEqual(['abc']);
  });

  it('falls back to the copy command when the Clipboard API is refused or missing', async () => {
    const refusing = { clipboard: { writeText: async () => Promise.reject(new Error('NotAllowedError')) } };
    const doc = fakeDocument(true);
    expect(await copyText('abc', refusing, doc as unknown as Document)).toBe(true);
    expect(await copyText('def', {}, doc as unknown as Document)).toBe(true);
    expect(doc.copied).toEqual(['abc', 'def']);
    expect(doc.body.children).toHaveLength(0); // the textarea is gone again
    expect(await copyText('ghi', {}, fakeDocument(false) as unknown as Document)).toBe(false);
    expect(await copyText('ghi', undefined, undefined)).toBe(false);
  });
});

describe('what the job detail shows', () => {
  it('searches the log, with the worker filter, any case', () => {
    const m = new PanelModel();
    m.apply(state([job('a')]));
    m.apply({ type: 'logs', job: 'a', lines: [['w1', 1, 'Loading data'], ['w2', 1, 'loading model'],
                                               ['w1', 2, 'done']] });
    m.search('LOADING');
    expect(m.visibleLines().map(l => l[2])).toEqual(['Loading data', 'loading model']);
    m.filter('w2');
    expect(m.visibleLines().map(l => l[2])).toEqual(['loading model']);
    m.search('  ');
    m.filter(ALL_WORKERS);
    expect(m.matchingLines()).toHaveLength(3);
    expect(m.lineCount()).toBe(3);
  });

  it('restores the job chosen before a reload once the state lists it, and pins it', () => {
    const m = new PanelModel();
    m.wanted = 'old';
    m.apply(state([job('new')], [job('old', { state: 'done' })]));
    expect(m.selected).toBe('old');
    expect(m.wanted).toBeNull();
    m.apply(state([job('new'), job('newer')], [job('old', { state: 'done' })]));
    expect(m.selected).toBe('old'); // (pinned: a new running job does not take over)
  });

  it('forgets a wanted job the cluster no longer lists', () => {
    const m = new PanelModel();
    m.wanted = 'gone';
    m.apply(state([job('a')]));
    expect(m.selected).toBe('a');
    expect(m.wanted).toBeNull();
  });

  it('shows a builtin exception without its module', () => {
    expect(exceptionName('builtins.ValueError')).toBe('ValueError');
    expect(exceptionName('numpy.linalg.LinAlgError')).toBe('numpy.linalg.LinAlgError');
  });

  it('names a job by its function, else its id', () => {
    expect(jobName(job('0123456789abcdef', { name: 'train · cell [3]' }))).toBe('train · cell [3]');
    expect(jobName(job('0123456789abcdef', { name: null }))).toBe('01234567');
  });

  it('keeps the history of the jobs it lists', () => {
    const m = new PanelModel();
    m.apply(state([job('a')]));
    const h = { started: 1, step: 0.5, workers: [], points: [], bars: [], missed: 0, failures: [], ended: false };
    m.setJobHistory('a', h);
    expect(m.history('a')).toBe(h);
    m.show('charts');
    expect(m.tab).toBe('charts');
    m.apply(state([job('b')]));
    expect(m.history('a')).toBeUndefined();
  });
});
