import { ALL_WORKERS, duration, IJob, LogLine, MAX_LINES, PanelModel, progress, total } from '../model';

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
