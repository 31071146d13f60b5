import {
  areaPath,
  busyChart,
  compact,
  escapeXml,
  legend,
  linePath,
  linear,
  progressChart,
  rates,
  slotOrder,
  stack,
  timelineChart,
  timelineLayout,
  timeSpan
} from '../charts';
import { Bar, IHistory, IJob } from '../model';

function history(extra: Partial<IHistory> = {}): IHistory {
  const empty = { started: 100, step: 0.5, workers: [], points: [], bars: [], missed: 0, failures: [], ended: false };
  return { ...empty, ...extra };
}

const job: IJob = { id: 'ab', done: 40, failed: 2, submitted: 100, total: 100, queued: 0, slots: 4, elapsed: 4,
                    state: 'running' };

describe('scales and paths', () => {
  it('maps linearly, an empty domain to the start of the range', () => {
    expect(linear(0, 10, 0, 100)(2.5)).toBe(25);
    expect(linear(0, 10, 50, 0)(10)).toBe(0);
    expect(linear(3, 3, 7, 9)(3)).toBe(7);
  });

  it('builds line and closed area paths', () => {
    expect(linePath([[0, 10], [5.55, 2]])).toBe('M0,10L5.6,2');
    expect(areaPath([[0, 1], [10, 2]], 20)).toBe('M0,1L10,2L10,20L0,20Z');
    expect(areaPath([[0, 1], [10, 2]], [[0, 5], [10, 6]])).toBe('M0,1L10,2L10,6L0,5Z');
    expect(areaPath([], 3)).toBe('');
  });

  it('computes calls a second between points, skipping repeated times', () => {
    expect(rates([[0, 0], [2, 10], [2, 12], [4, 12], [5, 20]])).toEqual([[2, 5], [4, 0], [5, 8]]);
    expect(rates([[0, 5]])).toEqual([]);
  });

  it('stacks the workers of each point', () => {
    const points = [[0, 0, 0, 3, 1, 2], [1, 5, 0, 3, 2, 0]];
    expect(stack(points, 2)).toEqual([[[0, 1], [0, 2]], [[1, 3], [2, 2]]]);
  });

  it('formats small labels and escapes text', () => {
    expect([0, 3.25, 12.4, 1234, 2_500_000].map(compact)).toEqual(['0', '3.3', '12', '1.2k', '2.5M']);
    expect(escapeXml('<a href="x">&</a>')).toBe('&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;');
    expect(legend(['w<1>', 'other'])).toContain('w&lt;1&gt;');
  });
});

describe('charts', () => {
  const h = history({
    workers: ['w1', 'w2'],
    points: [[100, 0, 0, 0, 0, 0], [101, 10, 0, 4, 2, 2], [102, 30, 1, 4, 2, 2], [104, 40, 2, 4, 1, 1]],
    bars: [['w1/0', 100.2, 101, 5, 0, 1], ['w1/1', 100.2, 102, 10, 1, 1], ['w2/10', 101, 104, 20, 0, 3],
           ['w2/2', 101, 103.5, 5, 0, 1]]
  });

  it('spans the job from its start to its last point or bar', () => {
    expect(timeSpan(h)).toEqual([100, 104]);
    expect(timeSpan(history({ started: null }))).toEqual([0, 0]);
  });

  it('draws throughput as an area and progress as a line, with their labels', () => {
    const svg = progressChart(h, job, 200);
    expect(svg).toContain('class="burla-rate"');
    expect(svg).toContain('class="burla-done-line"');
    expect(svg).toContain('class="burla-failed-line"'); // (some calls failed)
    expect(svg).toContain('5 calls/s now · peak 20');
    expect(svg).toContain('40% done');
    expect(progressChart(history({ points: [] }), job, 200)).toContain('no progress recorded yet');
    // a job over within one bucket: one point, no rate, but how far it got
    const quick = progressChart(history({ points: [[100, 10, 0, 0]] }), { ...job, done: 10, total: 10 }, 200);
    expect(quick).toContain('100% done');
    expect(quick).toContain('too quick to chart');
  });

  it('draws a band per worker and the job\'s slots', () => {
    const svg = busyChart(h, 200);
    expect(svg.match(/class="burla-band"/g)).toHaveLength(2);
    expect(svg).toContain('burla-slots-line');
    expect(svg).toContain('up to 4');
    expect(busyChart(history(), 200)).toContain('no busy slots');
  });

  it('orders slots by worker then index, and lays a bar per result out by time', () => {
    expect(slotOrder(h.bars)).toEqual(['w1/0', 'w1/1', 'w2/2', 'w2/10']);
    const { rows, rowHeight, gutter, rects } = timelineLayout(h, 248);
    expect(rows).toHaveLength(4);
    expect(rowHeight).toBe(12);
    expect(gutter).toBe(48);
    const last = rects[2]; // w2/10: the fourth row, from t=101 to t=104 of 100..104 over 48..248
    expect(last.y).toBe(3 * 12);
    expect(last.x).toBe(98);
    expect(last.w).toBe(150);
    expect(last.title).toBe('w2/10 · 20 calls · 3.0 s (3 results)');
    expect(rects[1].failed).toBe(true);
    expect(rects[1].title).toContain('1 failed');
  });

  it('keeps the timeline small however many slots, and every bar at least a pixel wide', () => {
    const bars: Bar[] = [];
    for (let s = 0; s < 500; s++) {
      bars.push([`w${s % 50}/${s}`, 100, 100.0001, 1, 0, 1]);
    }
    bars.push(['w0/0', 100, 200, 1, 0, 1]);
    const { rowHeight, gutter, rects } = timelineLayout(history({ bars }), 300);
    expect(rowHeight).toBe(2);
    expect(gutter).toBe(0);
    expect(Math.min(...rects.map(r => r.w))).toBe(1);
    const svg = timelineChart(history({ bars }), 300);
    expect(svg.match(/<rect /g)).toHaveLength(501);
    expect(svg).toContain('500 slots');
    expect(timelineChart(history(), 300)).toContain('no results');
  });
});
