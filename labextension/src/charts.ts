/**
 * The pictures of a job in the panel, as SVG text: throughput and progress over time, busy slots per worker over
 * time, and the task timeline (a bar per result, per slot, as Dask's task stream). Pure functions of the history
 * the server keeps (IHistory, see burla_jupyter/manager.py), so they are unit tested without a browser; the server
 * bounds the history (300 points, 1500 bars), so drawing costs the same for a job of any size.
 */

import { Bar, duration, IHistory, IJob, total } from './model';

// Workers' colours (no red: red is for failures); "other" workers are grey.
export const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#bcbd22',
                        '#393b79', '#637939', '#8c6d31', '#7b4173'];
export const OTHER_COLOR = '#9e9e9e';

export function workerColor(name: string, index: number): string {
  return name === 'other' ? OTHER_COLOR : PALETTE[index % PALETTE.length];
}

export function escapeXml(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** 1234 -> "1.2k": numbers that fit a small label. */
export function compact(n: number): string {
  const a = Math.abs(n);
  if (a >= 1e6) {
    return `${+(n / 1e6).toFixed(1)}M`;
  }
  if (a >= 1e3) {
    return `${+(n / 1e3).toFixed(1)}k`;
  }
  return a >= 10 || n === 0 ? `${Math.round(n)}` : `${+n.toFixed(1)}`;
}

/** A linear map from [d0, d1] to [r0, r1] (all of it to r0 when the domain is empty). */
export function linear(d0: number, d1: number, r0: number, r1: number): (v: number) => number {
  const k = d1 === d0 ? 0 : (r1 - r0) / (d1 - d0);
  return v => r0 + (v - d0) * k;
}

/** Calls a second over each interval between two points: [t at the interval's end, rate]. */
export function rates(points: number[][]): [number, number][] {
  const out: [number, number][] = [];
  for (let i = 1; i < points.length; i++) {
    const dt = points[i][0] - points[i - 1][0];
    if (dt > 0) {
      out.push([points[i][0], Math.max(points[i][1] - points[i - 1][1], 0) / dt]);
    }
  }
  return out;
}

function num(v: number): string {
  return (Math.round(v * 10) / 10).toString();
}

/** An SVG path through the points. */
export function linePath(xy: [number, number][]): string {
  return xy.map(([x, y], i) => `${i ? 'L' : 'M'}${num(x)},${num(y)}`).join('');
}

/** A closed SVG path between an upper line and a lower one (the same xs, the lower a baseline where omitted). */
export function areaPath(upper: [number, number][], lower: [number, number][] | number): string {
  if (!upper.length) {
    return '';
  }
  const base = typeof lower === 'number' ? upper.map(([x]) => [x, lower] as [number, number]) : lower;
  return linePath(upper) + base.slice().reverse().map(([x, y]) => `L${num(x)},${num(y)}`).join('') + 'Z';
}

/** Each worker's band of a stacked chart: [lower, upper] busy slots at each point (workers in order). */
export function stack(points: number[][], workers: number, first = 4): [number, number][][] {
  const bands: [number, number][][] = [];
  const floor = points.map(() => 0);
  for (let w = 0; w < workers; w++) {
    bands.push(points.map((p, i) => {
      const lo = floor[i];
      floor[i] += p[first + w] ?? 0;
      return [lo, floor[i]];
    }));
  }
  return bands;
}

/** The job's time span: from its start (the broker's clock) to its last point or bar. */
export function timeSpan(history: IHistory): [number, number] {
  let t0 = history.started ?? Infinity;
  let t1 = -Infinity;
  for (const p of history.points) {
    t0 = Math.min(t0, p[0]);
    t1 = Math.max(t1, p[0]);
  }
  for (const b of history.bars) {
    t0 = Math.min(t0, b[1]);
    t1 = Math.max(t1, b[2]);
  }
  if (!isFinite(t0) || !isFinite(t1)) {
    return [0, 0];
  }
  return [t0, Math.max(t1, t0)];
}

const LABEL = 11; // px: the height of a line of labels

function svg(width: number, height: number, cls: string, body: string): string {
  return `<svg class="burla-chart ${cls}" xmlns="http://www.w3.org/2000/svg" width="${width}" height="${height}" ` +
    `viewBox="0 0 ${width} ${height}">${body}</svg>`;
}

function text(x: number, y: number, s: string, anchor = 'start'): string {
  return `<text x="${num(x)}" y="${num(y)}" text-anchor="${anchor}">${escapeXml(s)}</text>`;
}

function empty(width: number, cls: string, why: string): string {
  return svg(width, 2 * LABEL, cls, text(0, LABEL + 2, why));
}

/** Calls a second (area, left scale) and the fraction done (line, 0 to 100 %) over the job's time. */
export function progressChart(history: IHistory, job: IJob | undefined, width: number, height = 72): string {
  const points = history.points;
  const r = rates(points);
  if (!r.length) {
    if (!points.length) {
      return empty(width, 'burla-progress-chart', 'no progress recorded yet');
    }
    // one point: a job over within one bucket has no rate to draw, but how far it got is known
    const last = points[points.length - 1];
    const n = Math.max(job ? total(job) : 0, last[1], 1);
    return svg(width, 2 * LABEL, 'burla-progress-chart',
      text(0, LABEL + 2, `${compact(last[1])} calls, too quick to chart`) +
      text(width, LABEL + 2, `${Math.floor((100 * Math.min(last[1], n)) / n)}% done`, 'end'));
  }
  const [t0, t1] = timeSpan(history);
  const top = LABEL + 3;
  const bottom = height - LABEL - 2;
  const x = linear(t0, t1, 0, width);
  const peak = Math.max(...r.map(p => p[1]));
  const y = linear(0, peak * 1.1 || 1, bottom, top); // (a little room above the peak)
  // the rate holds over each interval: a step from the previous point's time
  const steps: [number, number][] = [];
  for (let i = 0; i < r.length; i++) {
    const from = i ? r[i - 1][0] : points[0][0];
    steps.push([x(from), y(r[i][1])], [x(r[i][0]), y(r[i][1])]);
  }
  const last = points[points.length - 1];
  const n = Math.max(job ? total(job) : 0, last[1], 1);
  const yDone = linear(0, n, bottom, top);
  const done = linePath(points.map(p => [x(p[0]), yDone(Math.min(p[1], n))] as [number, number]));
  const failed = points.some(p => p[2] > 0)
    ? `<path class="burla-failed-line" d="${linePath(points.map(p => [x(p[0]), yDone(Math.min(p[2], n))]))}"/>`
    : '';
  const now = r[r.length - 1][1];
  const body =
    `<path class="burla-rate" d="${areaPath(steps, bottom)}"/>` +
    `<path class="burla-done-line" d="${done}"/>` + failed +
    `<line class="burla-axis" x1="0" x2="${width}" y1="${num(bottom)}" y2="${num(bottom)}"/>` +
    text(0, LABEL, `${compact(now)} calls/s now · peak ${compact(peak)}`) +
    text(width, LABEL, `${Math.floor((100 * Math.min(last[1], n)) / n)}% done`, 'end') +
    text(0, height - 2, '0 s') + text(width, height - 2, duration(t1 - t0), 'end');
  return svg(width, height, 'burla-progress-chart', body);
}

/** Busy slots of the job's workers over its time, stacked by worker, and the job's own slots (dashed). */
export function busyChart(history: IHistory, width: number, height = 64): string {
  const { points, workers } = history;
  if (points.length < 2 || !workers.length) {
    return empty(width, 'burla-busy-chart', 'no busy slots recorded yet');
  }
  const [t0, t1] = timeSpan(history);
  const top = LABEL + 3;
  const bottom = height - 2;
  const bands = stack(points, workers.length);
  const highest = bands[bands.length - 1];
  const most = Math.max(...points.map((p, i) => Math.max(p[3], highest[i][1])));
  const x = linear(t0, t1, 0, width);
  const y = linear(0, most * 1.05 || 1, bottom, top);
  const areas = bands.map((band, w) => {
    const upper = band.map((b, i) => [x(points[i][0]), y(b[1])] as [number, number]);
    const lower = band.map((b, i) => [x(points[i][0]), y(b[0])] as [number, number]);
    return `<path class="burla-band" fill="${workerColor(workers[w], w)}" d="${areaPath(upper, lower)}">` +
      `<title>${escapeXml(workers[w])}</title></path>`;
  });
  const slots = linePath(points.map(p => [x(p[0]), y(p[3])] as [number, number]));
  const body = areas.join('') + `<path class="burla-slots-line" d="${slots}"/>` +
    `<line class="burla-axis" x1="0" x2="${width}" y1="${num(bottom)}" y2="${num(bottom)}"/>` +
    text(0, LABEL, `busy slots: up to ${compact(most)}`) + text(width, LABEL, '- - the job\'s slots', 'end');
  return svg(width, height, 'burla-busy-chart', body);
}

/** The workers' colours, for the busy chart's legend: HTML. */
export function legend(workers: string[]): string {
  return workers.map((w, i) => `<span class="burla-legend-item"><span class="burla-swatch" style="background:` +
    `${workerColor(w, i)}"></span>${escapeXml(w)}</span>`).join('');
}

/** Slots in order: by worker, then by index as a number ("w1/2" before "w1/10"). */
export function slotOrder(bars: Bar[]): string[] {
  return Array.from(new Set(bars.map(b => b[0]))).sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
}

export interface ITimelineRect {
  x: number;
  y: number;
  w: number;
  h: number;
  failed: boolean;
  title: string;
}

/** Where each bar goes: a row per slot, x by time. rowHeight shrinks with more slots so the picture stays small. */
export function timelineLayout(history: IHistory, width: number, maxHeight = 140): {
  rows: string[]; rowHeight: number; gutter: number; rects: ITimelineRect[];
} {
  const rows = slotOrder(history.bars);
  const rowHeight = Math.max(2, Math.min(12, Math.floor(maxHeight / Math.max(rows.length, 1))));
  const gutter = rowHeight >= 9 ? 48 : 0; // the slots' names, where they fit
  const [t0, t1] = timeSpan(history);
  const x = linear(t0, t1, gutter, width);
  const row = new Map(rows.map((r, i) => [r, i]));
  const rects = history.bars.map(([slot, a, b, calls, failed, results]) => {
    const left = x(a);
    return {
      x: left,
      y: (row.get(slot) ?? 0) * rowHeight,
      w: Math.max(x(b) - left, failed > 0 ? 3 : 1), // (a failure stays in sight)
      h: Math.max(rowHeight - 1, 1),
      failed: failed > 0,
      title: `${slot} · ${calls.toLocaleString()} calls${failed ? `, ${failed.toLocaleString()} failed` : ''} · ` +
        duration(Math.max(b - a, 0)) + (results > 1 ? ` (${results.toLocaleString()} results)` : '')
    };
  });
  return { rows, rowHeight, gutter, rects };
}

/** The task timeline: a bar per result (calls that ran together), per slot, green when they all worked. */
export function timelineChart(history: IHistory, width: number): string {
  if (!history.bars.length) {
    return empty(width, 'burla-timeline', 'no results on the timeline yet');
  }
  const { rows, rowHeight, gutter, rects } = timelineLayout(history, width);
  const height = rows.length * rowHeight + LABEL + 2;
  const [t0, t1] = timeSpan(history);
  const names = gutter
    ? rows.map((r, i) => text(0, i * rowHeight + rowHeight - 2, r.length > 9 ? `${r.slice(0, 8)}…` : r)).join('')
    : '';
  rects.sort((a, b) => +a.failed - +b.failed); // failures drawn last, over the rest
  const bars = rects.map(r => `<rect class="${r.failed ? 'burla-bar-failed' : 'burla-bar-ok'}" x="${num(r.x)}" ` +
    `y="${r.y}" width="${num(r.w)}" height="${r.h}"><title>${escapeXml(r.title)}</title></rect>`).join('');
  const axis = text(gutter, height - 2, '0 s') + text(width, height - 2, duration(t1 - t0), 'end') +
    text((gutter + width) / 2, height - 2, `${rows.length} slots`, 'middle');
  return svg(width, height, 'burla-timeline', names + bars + axis);
}
